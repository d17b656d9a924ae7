"""Parameter, Module and Sequential: the containers around the functional math."""
import contextlib
import math
import os
import weakref

import numpy

from .. import backend, interop, onnx_export, validate
from ..backends.cpu.workspace import Workspace
from ..functional import _checks


class Parameter:
    """A trainable array and its gradient, like torch.nn.Parameter (.data, .grad)."""

    def __init__(self, data):
        self.data = data
        self.grad = None

    def accumulate(self, grad):
        """Add a gradient (PyTorch accumulates until zero_grad)."""
        if self.grad is None:
            self.grad = grad
        else:
            self.grad += grad

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, " \
               f"device={backend.device_of(self.data)})"


class Buffer:
    """A non-trainable array in a module's state (running statistics), like
    torch's registered buffers: saved, loaded and moved with the module, never
    seen by an optimizer. Integer buffers keep their dtype under .to(dtype)."""

    def __init__(self, data):
        self.data = data
        self.grad = None  # lets Module.to treat buffers and parameters alike


# module -> the functions to call once its backward has run inside a container (weak:
# a hook neither keeps a module alive nor travels with it when it is pickled or copied)
_BACKWARD_DONE_HOOKS = weakref.WeakKeyDictionary()


def add_backward_done_hook(module, fn):
    """Call fn(module) each time a container (Sequential, Residual) has run module's
    backward: its parameters' gradients (and those of the modules below it) are then
    final for this step, unless the module is used twice in one forward. A data-
    parallel reducer starts summing a bucket of gradients across processes from
    here while backward goes on. Returns a function that removes the hook."""
    hooks = _BACKWARD_DONE_HOOKS.setdefault(module, [])
    hooks.append(fn)
    return lambda: hooks.remove(fn) if fn in hooks else None


def backward_done(module):
    """What a container calls after module.backward: module's hooks, if it has any."""
    hooks = _BACKWARD_DONE_HOOKS.get(module)
    if hooks:
        for fn in list(hooks):
            fn(module)


_RELEASED = type("Released", (), {"__repr__": lambda self: "<released by backward>"})()


class Module:
    """Base of every layer.

    The layer protocol: forward(x) calls a functional forward, which returns
    (y, ctx), keeps ctx with ``self._keep(ctx)`` and returns y; backward(dy) reads
    it back with ``ctx = self._take()`` and hands it to the functional backward.
    One ctx a layer (never None): the next forward replaces it, backward releases
    it. to() drops what was kept; summary() leaves it as it was.
    """

    training = True

    def __init__(self):
        self._params = {}
        self._buffers = {}
        # the arrays forward builds for backward, kept from step to step
        # (gpucnn.backends.cpu.workspace)
        self._workspace = Workspace()

    def __call__(self, x):
        # a PyTorch tensor, JAX array or anything offering __dlpack__/__array__ comes in
        # as a NumPy or CuPy array, without a copy where DLPack can share its memory
        return self.forward(backend.as_array(x))

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy, need_input_grad=True):
        raise NotImplementedError

    def _parameter(self, name, data):
        """A Parameter holding data, registered under name (state_dict, optimizers);
        None where data is None (a layer without a bias)."""
        if data is None:
            return None
        self._params[name] = Parameter(data)
        return self._params[name]

    def _keep(self, ctx):
        """Keep what this forward's backward needs (the functional forward's ctx):
        one slot a layer, replaced by the next forward."""
        self._ctx = ctx

    def _take(self):
        """The ctx the last forward kept, released as it is read (as PyTorch frees its
        graph), so that a second backward for one forward is an error rather than
        gradients added twice."""
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        if ctx is _RELEASED:
            raise RuntimeError(f"{type(self).__name__}.backward called a second time for one "
                               "forward; run forward again first (the gradients would "
                               "otherwise be added twice)")
        self._ctx = _RELEASED
        return ctx

    def children(self):
        return [module for _, module in self.named_children()]

    def named_children(self):
        """(name, module) of the direct sub-modules; the names build state_dict keys."""
        return []

    def named_modules(self, prefix=""):
        """(dotted name, module) of this module and every module below it, depth first,
        parents before their children; this module is named prefix without its dot
        ('' by default). The one walk of the module tree: parameters, buffers, state
        dicts, random states, summary and to() all go through it."""
        yield prefix.rstrip("."), self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}{name}.")

    def _named_items(self, store, prefix):
        """(dotted name, item) of the `store` dict ('_params' or '_buffers') of every module."""
        for name, m in self.named_modules(prefix):
            for key, item in getattr(m, store, {}).items():
                yield (f"{name}.{key}" if name else key), item

    def named_parameters(self, prefix=""):
        return self._named_items("_params", prefix)

    def named_buffers(self, prefix=""):
        return self._named_items("_buffers", prefix)

    def _named_state(self):
        """What state_dict holds, in PyTorch's order: per module, parameters then buffers."""
        for name, m in self.named_modules():
            prefix = f"{name}." if name else ""
            for store in (m._params, getattr(m, "_buffers", {})):
                for key, item in store.items():
                    yield prefix + key, item

    def random_state(self):
        """{module name: state} of every module that draws random numbers (Dropout);
        JSON-serialisable, stored in checkpoints so that a resume is bit-exact."""
        return {name: m.get_rng_state() for name, m in self.named_modules()
                if hasattr(m, "get_rng_state")}

    def load_random_state(self, states):
        own = {name: m for name, m in self.named_modules() if hasattr(m, "set_rng_state")}
        if set(own) != set(states):
            raise ValueError(f"random state is for modules {sorted(states)}, this model's "
                             f"random modules are {sorted(own)}")
        for name, state in states.items():
            own[name].set_rng_state(state)

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def buffers(self):
        """The Buffers (running statistics) of this module and those below it."""
        return [b for _, b in self.named_buffers()]

    def modules(self):
        """This module and every module below it, in named_modules' order."""
        return [m for _, m in self.named_modules()]

    def apply(self, fn):
        """Call fn(module) on every sub-module, children before their parents and this
        module last (PyTorch's order); returns self. E.g. re-initialise every Conv2D."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def train(self, mode=True):
        self.training = bool(mode)
        for child in self.children():
            child.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def device(self):
        params = self.parameters()
        return backend.device_of(params[0].data) if params else "cpu"

    def double(self):
        """Cast the parameters and float buffers to float64 (PyTorch's .double())."""
        return self.to(dtype=numpy.float64)

    def float(self):
        """Cast the parameters and float buffers to float32 (PyTorch's .float())."""
        return self.to(dtype=numpy.float32)

    def to(self, device=None, dtype=None):
        """Move parameters (and their gradients) to a device and/or cast to a float dtype.
        As in PyTorch, a dtype alone may come first: model.to(numpy.float64);
        torch.float32 and torch.float64 are taken for NumPy's."""
        if dtype is None and _is_dtype(device):
            device, dtype = None, device
        if device is not None:
            device, _ = backend.resolve_device(device)
        if dtype is not None:
            if _is_torch(dtype):  # NumPy cannot read torch's dtypes; these two it has
                if str(dtype) not in _TORCH_DTYPES:
                    raise TypeError(f"dtype must be float32 or float64, got {dtype}")
                dtype = _TORCH_DTYPES[str(dtype)]
            dtype = numpy.dtype(dtype)
            if dtype not in _checks.FLOAT_DTYPES:
                raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        for _, p in self._named_state():
            for attr in ("data", "grad"):
                a = getattr(p, attr)
                if a is None:
                    continue
                if device is not None:
                    a = backend.to_device(a, device)
                if dtype is not None and a.dtype.kind == "f":
                    a = a.astype(dtype, copy=False)
                setattr(p, attr, a)
        for _, m in self.named_modules():  # what forward kept holds the old device's arrays
            m._ctx = None
            if "_workspace" in vars(m):
                m._workspace.clear()
        return self

    def state_dict(self):
        """name -> array (references, on the module's device), like PyTorch."""
        return {name: p.data for name, p in self._named_state()}

    def load_state_dict(self, state, allow_nonfinite=False):
        """Copy arrays in; every name, type, shape and value is checked before
        anything changes. ValueError names a missing, unexpected, misshapen or
        non-finite entry (NaN/inf are refused unless allow_nonfinite=True);
        TypeError one that is not a numeric array.

        state: a mapping of name -> array (NumPy, CuPy, or any array offering
        __dlpack__ or __array__, e.g. a PyTorch model's state_dict()), or the path
        of a file written by gpucnn.save or torch.save (gpucnn.interop.read_state_dict)."""
        if isinstance(state, (str, os.PathLike)):
            state = interop.read_state_dict(state)
        if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
            raise TypeError(f"state_dict must be a mapping of name -> array, got "
                            f"{type(state).__name__}")
        state = {name: _as_array(name, state[name]) for name in state.keys()}
        own = dict(self._named_state())
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise ValueError(f"state_dict does not fit this model: missing keys "
                             f"{sorted(missing)}, unexpected keys {sorted(unexpected)}")
        for name, p in own.items():
            _check_state_entry(name, state[name], p.data, allow_nonfinite)
        for name, p in own.items():
            # into the arrays already there, as PyTorch's copy_: a CUDA graph captured
            # with them (gpucnn.backends.cuda.graph) then replays with the loaded values
            p.data[...] = backend.to_device(state[name], backend.device_of(p.data))
        return self

    def summary(self, input_shape, print_fn=print):
        """Print each layer's output shape and parameter count, with totals (Keras's
        model.summary, torchinfo's summary). input_shape: one sample's shape,
        without the batch axis, e.g. (1, 28, 28). Runs one forward pass on zeros
        in eval mode; the model's state, mode and what its layers kept for backward
        are unchanged. Returns the total number of parameters."""
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
        if not shape or not all(validate.is_int(v) and v > 0 for v in shape):
            raise ValueError(f"input_shape must be a tuple of positive ints without the batch "
                             f"axis, e.g. (1, 28, 28), got {input_shape!r}")
        params = self.parameters()
        dtype = params[0].data.dtype if params else numpy.float32
        xp = backend.xp_for(self.device)
        rows = []
        modules = [(name or type(self).__name__, m) for name, m in self.named_modules()]
        leaves = [(name, m) for name, m in modules if not m.children()]
        saved = [(m, dict(vars(m))) for _, m in modules]
        was_training = self.training

        def recorder(name, module, forward):
            def record(x):
                y = forward(x)
                rows.append((name, type(module).__name__, tuple(y.shape)[1:],
                             sum(math.prod(p.shape) for p in module.parameters())))
                return y
            return record

        try:
            self.eval()
            for name, m in leaves:
                m.forward = recorder(name, m, m.forward)
            out = self.forward(xp.zeros((1,) + shape, dtype=dtype))
        finally:
            for m, attrs in saved:  # removes the recorders, puts what forward kept back
                vars(m).clear()
                vars(m).update(attrs)
            self.train(was_training)
        total = sum(math.prod(p.shape) for p in params)
        lines = [f"{'Layer (type)':<32}{'Output shape':<22}{'Param #':>12}", "=" * 66,
                 f"{'input':<32}{str(shape):<22}{'':>12}"]
        lines += [f"{(name + ' (' + kind + ')'):<32}{str(s):<22}{n:>12,}"
                  for name, kind, s, n in rows]
        lines += ["=" * 66, f"Total params: {total:,}", f"Output shape: {tuple(out.shape)[1:]} "
                  f"per sample; parameters take {total * numpy.dtype(dtype).itemsize:,} bytes "
                  f"({numpy.dtype(dtype).name})"]
        print_fn("\n".join(lines))
        return total

    def to_onnx(self, path, input_shape=None, normalization=None, classes=None):
        """Write this model's eval-mode forward to path as ONNX (opset 17, a dynamic
        batch axis); input_shape is one sample's (C, H, W) (a model from gpucnn.load
        knows its own). Needs the onnx package. See gpucnn.onnx_export.export for
        normalization and classes. Returns path."""
        return onnx_export.export(self, path, input_shape, normalization, classes)

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self):
        return ""


_TORCH_DTYPES = {"torch.float32": numpy.float32, "torch.float64": numpy.float64}


def _is_torch(value):
    return type(value).__module__.split(".")[0] == "torch"


def _is_dtype(value):
    """Whether to()'s first argument names a dtype rather than a device."""
    if isinstance(value, numpy.dtype) or (isinstance(value, type) and
                                          issubclass(value, (numpy.generic, float))):
        return True
    if _is_torch(value):
        return type(value).__name__ == "dtype"
    return isinstance(value, str) and value in ("float32", "float64")


def _as_array(name, value):
    try:
        return backend.as_array(value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"state_dict[{name!r}]: {e}") from None


def _check_state_entry(name, value, current, allow_nonfinite):
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"state_dict[{name!r}] must be an array, got {type(value).__name__}")
    if value.dtype.kind not in "fiu":
        raise TypeError(f"state_dict[{name!r}] must hold numbers, got dtype {value.dtype}")
    if tuple(value.shape) != tuple(current.shape):
        raise ValueError(f"state_dict[{name!r}] has shape {tuple(value.shape)}, "
                         f"the model needs {tuple(current.shape)}")
    if not allow_nonfinite and value.dtype.kind == "f":
        xp = backend.get_array_module(value)
        if not bool(xp.isfinite(value).all()):
            raise ValueError(f"state_dict[{name!r}] holds NaN or infinite values; pass "
                             "allow_nonfinite=True to load them anyway")


@contextlib.contextmanager
def _naming_layer(i, layer, a, what):
    """Prefix a layer's ValueError/TypeError with its index (dotted through nested
    Sequentials), its type and the shape it got, so that a network whose shapes do
    not chain says where."""
    try:
        yield
    except (ValueError, TypeError) as e:
        named = getattr(e, "_gpucnn_layer", None)
        if named is not None:  # from a Sequential inside this one: extend its index
            index, rest = named
            e._gpucnn_layer = (f"{i}.{index}", rest)
        elif e.args and isinstance(e.args[0], str):
            shape = tuple(getattr(a, "shape", ()))
            e._gpucnn_layer = (str(i), f" ({type(layer).__name__}), {what} of shape {shape}: "
                                       f"{e.args[0]}")
        else:
            raise
        index, rest = e._gpucnn_layer
        e.args = (f"layer {index}{rest}",) + e.args[1:]
        raise


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, got {type(layer).__name__} at "
                                f"position {i}")
        self.layers = list(layers)

    def named_children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def forward(self, x):
        x = backend.as_array(x)  # as __call__ does: forward is the training step's entry
        for i, layer in enumerate(self.layers):
            with _naming_layer(i, layer, x, "input"):
                x = layer.forward(x)
        return x

    def backward(self, dy, need_input_grad=True):
        """Backpropagate dy; returns dx (None when need_input_grad is False)."""
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            with _naming_layer(i, self.layers[i], dy, "gradient"):
                dy = self.layers[i].backward(dy, need_input_grad=need_input_grad or i > 0)
            backward_done(self.layers[i])
        return dy

    def __repr__(self):
        return _tree_repr(self)


def _tree_repr(module):
    """PyTorch's layout: one '(name): child' line per child, nested children indented."""
    lines = [f"({name}): {child!r}".replace("\n", "\n  ")
             for name, child in module.named_children()]
    extra = module.extra_repr()
    inner = "\n  ".join(([extra] if extra else []) + lines)
    return f"{type(module).__name__}(\n  {inner}\n)"
