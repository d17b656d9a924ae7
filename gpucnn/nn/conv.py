"""Conv2D: torch.nn.Conv2d's arguments, initialisation and state-dict names."""
import math

from .. import functional as F
from .. import init as initialisers
from .. import random
from ..functional import _checks
from .layers import _positive_int
from .module import Module, Parameter


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
