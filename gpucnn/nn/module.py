"""Parameter, Module and Sequential: the containers around the functional math."""
import numpy

from .. import backend
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


class Module:
    """Base of every layer: forward(x) stores what backward(dy) needs."""

    training = True

    def __init__(self):
        self._params = {}
        self._buffers = {}

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy, need_input_grad=True):
        raise NotImplementedError

    def _saved(self, attr):
        value = getattr(self, attr, None)
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return value

    def children(self):
        return [module for _, module in self.named_children()]

    def named_children(self):
        """(name, module) of the direct sub-modules; the names build state_dict keys."""
        return []

    def named_modules(self, prefix=""):
        """(dotted name, module) of this module and every module below it, depth first."""
        yield prefix.rstrip("."), self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self, prefix=""):
        for name, p in self._params.items():
            yield prefix + name, p
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def named_buffers(self, prefix=""):
        for name, b in getattr(self, "_buffers", {}).items():
            yield prefix + name, b
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

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

    def to(self, device=None, dtype=None):
        """Move parameters (and their gradients) to a device and/or cast to a float dtype."""
        if device is not None:
            device, _ = backend.resolve_device(device)
        if dtype is not None:
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
        self._clear_saved()
        return self

    def _clear_saved(self):
        for attr in [a for a in vars(self) if a.startswith("_saved_")]:
            setattr(self, attr, None)
        for child in self.children():
            child._clear_saved()

    def state_dict(self):
        """name -> array (references, on the module's device), like PyTorch."""
        return {name: p.data for name, p in self._named_state()}

    def load_state_dict(self, state):
        """Copy arrays in; every name and shape is checked before anything changes."""
        own = dict(self._named_state())
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise KeyError(f"state_dict does not fit this model: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        for name, p in own.items():
            if tuple(state[name].shape) != tuple(p.data.shape):
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(state[name].shape)}, "
                                 f"the model needs {tuple(p.data.shape)}")
        for name, p in own.items():
            device = backend.device_of(p.data)
            p.data = backend.to_device(state[name], device).astype(p.data.dtype, copy=True)
        return self

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self):
        return ""


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
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy, need_input_grad=True):
        """Backpropagate dy; returns dx (None when need_input_grad is False)."""
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            dy = self.layers[i].backward(dy, need_input_grad=need_input_grad or i > 0)
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
