"""MaxPool2D and AvgPool2D: torch.nn's pooling layers."""
from .. import functional as F
from .geometry import GeometryCache
from .module import Module


class _Pool(Module):
    """A pooling layer: its arguments are checked once, here; its PoolGeometry is
    computed once per input shape and kept with what backward needs."""

    def __init__(self, **args):
        super().__init__()
        self._pool_args = args
        self._arguments = F.pool.arguments(**args)
        self._geometries = GeometryCache()
        for name, value in args.items():
            setattr(self, name, value)

    def _geometry_for(self, x):
        """The PoolGeometry for input x, computed when its shape (or type) changes."""
        key = (type(x), x.dtype, tuple(x.shape))
        return self._geometries.get(key, lambda: F.pool.geometry_for(x, self._arguments))

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
        y, ctx = F.pool.max_forward(x, self._geometry_for(x))
        self._keep(ctx)
        return y

    def backward(self, dy, need_input_grad=True):
        return F.pool.max_backward(dy, self._take())


class AvgPool2D(_Pool):
    """Average pooling, torch.nn.AvgPool2d's arguments: count_include_pad=False
    divides by the cells inside the input, divisor_override by a fixed number."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__(kernel_size=kernel_size, stride=stride, padding=padding,
                         ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                         divisor_override=divisor_override)

    def forward(self, x):
        y, ctx = F.pool.avg_forward(x, self._geometry_for(x))
        self._keep(ctx)
        return y

    def backward(self, dy, need_input_grad=True):
        return F.pool.avg_backward(dy, self._take())
