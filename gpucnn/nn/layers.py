"""The layers: each keeps what its backward needs and calls gpucnn.functional."""
import math
import numbers

from .. import backend
from .. import functional as F
from .. import init as initialisers
from .. import random
from ..functional import _checks
from .module import Module, Parameter


def _positive_int(value, name):
    """A positive Python or NumPy integer, as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {int(value)}")
    return int(value)


class ReLU(Module):
    def forward(self, x):
        self._saved_x = x
        return F.relu(x)

    def backward(self, dy, need_input_grad=True):
        return F.relu_backward(dy, self._saved("_saved_x"))


class Flatten(Module):
    """(N, ...) -> (N, prod(...)), torch.nn.Flatten's default."""

    def forward(self, x):
        _checks.float_array(x, "input")
        if x.ndim < 2:
            raise ValueError(f"Flatten needs an input with a batch axis, got shape {x.shape}")
        self._saved_shape = tuple(x.shape)
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))  # -1 fails for an empty batch

    def backward(self, dy, need_input_grad=True):
        return dy.reshape(self._saved("_saved_shape"))


class Linear(Module):
    """y = x W^T + b, torch.nn.Linear's initialisation: U(-1/sqrt(in), 1/sqrt(in)),
    or init='kaiming_normal': weight from N(0, 2/out_features)."""

    def __init__(self, in_features, out_features, bias=True, init="default"):
        super().__init__()
        initialisers.check_init(init)
        in_features = _positive_int(in_features, "in_features")
        out_features = _positive_int(out_features, "out_features")
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features)
        shape = (out_features, in_features)
        self.weight = Parameter(random.uniform(shape, bound) if init == "default" else
                                random.normal(shape, math.sqrt(2 / out_features)))
        self._params["weight"] = self.weight
        self.bias = Parameter(random.uniform((out_features,), bound)) if bias else None
        if bias:
            self._params["bias"] = self.bias

    def forward(self, x):
        self._saved_x = x
        return F.linear(x, self.weight.data, self.bias.data if self.bias else None)

    def backward(self, dy, need_input_grad=True):
        dx, dw, db = F.linear_backward(dy, self._saved("_saved_x"), self.weight.data)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability p and
    scale the rest by 1/(1-p); in eval, the identity."""

    def __init__(self, p=0.5):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.seed = int(random.host_rng().integers(2**63))
        self.calls = 0  # masks drawn so far: with the seed, the whole random state

    def get_rng_state(self):
        return {"seed": self.seed, "calls": self.calls}

    def set_rng_state(self, state):
        self.seed, self.calls = int(state["seed"]), int(state["calls"])

    def forward(self, x):
        _checks.float_array(x, "input")
        if not self.training or self.p == 0:
            self._saved_mask = 1
            return x
        xp = backend.get_array_module(x)
        keep = random.generator(xp, self.seed, self.calls).random(x.shape, dtype=x.dtype) >= self.p
        self.calls += 1
        scale = 0.0 if self.p == 1 else 1 / (1 - self.p)
        self._saved_mask = keep.astype(x.dtype) * x.dtype.type(scale)
        return x * self._saved_mask

    def backward(self, dy, need_input_grad=True):
        return dy * self._saved("_saved_mask")

    def extra_repr(self):
        return f"p={self.p}"


class GlobalAvgPool2D(Module):
    """(N, C, H, W) -> (N, C): each channel's mean (AdaptiveAvgPool2d(1) + flatten)."""

    def forward(self, x):
        y = F.global_avg_pool2d(x)
        self._saved_shape = tuple(x.shape)
        return y

    def backward(self, dy, need_input_grad=True):
        return F.global_avg_pool2d_backward(dy, self._saved("_saved_shape"))


class Identity(Module):
    """Returns its input; backward returns dy."""

    def forward(self, x):
        return x

    def backward(self, dy, need_input_grad=True):
        return dy
