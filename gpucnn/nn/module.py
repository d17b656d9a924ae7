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


class Module:
    """Base of every layer: forward(x) stores what backward(dy) needs."""

    training = True

    def __init__(self):
        self._params = {}

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
        return []

    def named_parameters(self, prefix=""):
        for name, p in self._params.items():
            yield prefix + name, p
        for i, child in enumerate(self.children()):
            yield from child.named_parameters(f"{prefix}{i}.")

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
        for p in self.parameters():
            for attr in ("data", "grad"):
                a = getattr(p, attr)
                if a is None:
                    continue
                if device is not None:
                    a = backend.to_device(a, device)
                if dtype is not None:
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
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays in; every name and shape is checked before anything changes."""
        own = dict(self.named_parameters())
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

    def children(self):
        return self.layers

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
        inner = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"
