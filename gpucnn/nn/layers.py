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


class Conv2D(Module):
    """2-D convolution, torch.nn.Conv2d's arguments and initialisation.

    weight (out_channels, in_channels/groups, kH, kW) and bias (out_channels,)
    are drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in_channels/groups*kH*kW.
    init='kaiming_normal' draws the weight from N(0, 2/fan_out) instead, fan_out =
    out_channels*kH*kW (torchvision's ResNet); the bias keeps the default.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, init="default"):
        super().__init__()
        initialisers.check_init(init)
        in_channels = _positive_int(in_channels, "in_channels")
        out_channels = _positive_int(out_channels, "out_channels")
        groups = _positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels ({in_channels}) and "
                             f"out_channels ({out_channels})")
        kh, kw = _checks.pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        bound = 1 / math.sqrt(in_channels // groups * kh * kw)
        shape = (out_channels, in_channels // groups, kh, kw)
        self.weight = Parameter(random.uniform(shape, bound) if init == "default" else
                                random.normal(shape, math.sqrt(2 / (out_channels * kh * kw))))
        self._params["weight"] = self.weight
        self.bias = Parameter(random.uniform((out_channels,), bound)) if bias else None
        if bias:
            self._params["bias"] = self.bias
        # stride, dilation and padding are checked here rather than at the first forward
        F.conv.padding_amounts(padding, kh, kw, _checks.pair(stride, "stride"),
                               _checks.pair(dilation, "dilation"))

    def _args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def _geometry_for(self, x):
        """The ConvGeometry for input x: checked and computed once per input shape
        (and dtype and array type), then shared by forward and backward."""
        w, b = self.weight.data, self.bias.data if self.bias else None
        key = (x.shape, x.dtype, type(x), w.shape, w.dtype, type(w),
               None if b is None else b.dtype)
        if getattr(self, "_geometry_key", None) != key:
            self.geometry = F.conv.geometry(x, w, b, **self._args())
            self._geometry_key = key
        return self.geometry

    def forward(self, x):
        g = self._geometry_for(x)
        bias = self.bias.data if self.bias else None
        self._saved_x = x
        if not self.training:  # a backward in eval mode is rare: it pads x again
            self._saved_source = None
            return F.conv.forward(x, self.weight.data, bias, g)
        y, self._saved_source = F.conv.forward(x, self.weight.data, bias, g, save=True,
                                               workspace=self._workspace)
        return y

    def backward(self, dy, need_input_grad=True):
        x = self._saved("_saved_x")
        source, self._saved_source = self._saved_source, None  # None on a GPU
        dx, dw, db = F.conv.backward(dy, x, self.weight.data, self._geometry_for(x),
                                     need_input_grad, saved=source)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class _Pool(Module):
    """A pooling layer: its arguments are checked once, here; its PoolGeometry is
    computed once per input shape and shared by forward and backward."""

    def __init__(self, **args):
        super().__init__()
        self._pool_args = args
        self._parsed = F.pool.arguments(**args)
        for name, value in args.items():
            setattr(self, name, value)

    def _geometry_for(self, x):
        """The PoolGeometry for input x, computed when its shape (or type) changes and
        saved for backward."""
        key = (type(x), x.dtype, tuple(x.shape))
        if getattr(self, "_geometry_key", None) != key:
            self._geometry = F.pool.geometry_for(x, self._parsed)
            self._geometry_key = key
        self._saved_geometry = self._geometry
        return self._geometry

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self._pool_args.items())


class MaxPool2D(_Pool):
    """Max pooling; the gradient goes to each window's first maximum (PyTorch's rule).

    torch.nn.MaxPool2d's arguments; ceil_mode is keyword-only (PyTorch's fifth
    positional argument is return_indices).
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, *, ceil_mode=False):
        super().__init__(kernel_size=kernel_size, stride=stride, padding=padding,
                         dilation=dilation, ceil_mode=ceil_mode)

    def forward(self, x):
        y, self._saved_indices = F.pool.max_forward(x, self._geometry_for(x))
        return y

    def backward(self, dy, need_input_grad=True):
        return F.pool.max_backward(dy, self._saved("_saved_indices"),
                                   self._saved("_saved_geometry"))


class AvgPool2D(_Pool):
    """Average pooling, torch.nn.AvgPool2d's arguments: count_include_pad=False
    divides by the cells inside the input, divisor_override by a fixed number."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__(kernel_size=kernel_size, stride=stride, padding=padding,
                         ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                         divisor_override=divisor_override)

    def forward(self, x):
        return F.pool.avg_forward(x, self._geometry_for(x))

    def backward(self, dy, need_input_grad=True):
        return F.pool.avg_backward(dy, self._saved("_saved_geometry"))


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
