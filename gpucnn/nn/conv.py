"""Conv2D: torch.nn.Conv2d's arguments, initialisation and state-dict names."""

from .. import functional as F
from .. import init as initialisers
from .. import validate
from .geometry import GeometryCache
from .module import Module


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
        in_channels = validate.positive_int(in_channels, "in_channels", type_error=TypeError)
        out_channels = validate.positive_int(out_channels, "out_channels", type_error=TypeError)
        groups = validate.positive_int(groups, "groups", type_error=TypeError)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels ({in_channels}) and "
                             f"out_channels ({out_channels})")
        kh, kw = validate.pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        shape = (out_channels, in_channels // groups, kh, kw)
        weight, bias = initialisers.layer_parameters(shape, bias, init)
        self.weight = self._parameter("weight", weight)
        self.bias = self._parameter("bias", bias)
        # stride, dilation and padding are parsed here, once, rather than at each forward
        self._arguments = F.conv.arguments(stride, padding, dilation, groups)
        self._geometries = GeometryCache()

    @property
    def geometry(self):
        """The ConvGeometry of the last input (None before the first forward)."""
        return self._geometries.value

    def _geometry_for(self, x, w, b):
        """The ConvGeometry for input x: checked and computed once per input shape
        (and dtype and array type)."""
        key = (x.shape, x.dtype, type(x), w.shape, w.dtype, type(w),
               None if b is None else b.dtype)
        return self._geometries.get(key, lambda: F.conv.geometry_for(x, w, b, self._arguments))

    def forward(self, x):
        w, b = self.weight.data, self.bias.data if self.bias else None
        g = self._geometry_for(x, w, b)
        y, ctx = F.conv.forward(x, w, b, g, workspace=self._workspace if self.training else None)
        # an eval forward keeps no padded input: a backward there (rare) builds it again
        self._keep(ctx if self.training else ctx._replace(source=None))
        return y

    def backward(self, dy, need_input_grad=True):
        dx, dw, db = F.conv.backward(dy, self._take(), need_input_grad)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")
