"""Max and average pooling over (R, S) windows, forward and backward (PyTorch's rules).

Shapes: x (N, C, H, W) -> y (N, C, P, Q). The window of output (p, q) starts at
(h0, w0) = (p*sh - ph, q*sw - pw); its cells are (h0 + r*dh, w0 + s*dw) for
r < R, s < S (dilation dh, dw: max pooling only). ceil_mode rounds the output
size up, but drops a last window that would start in the bottom/right padding.

    max:  y[n,c,p,q] = max over the window's cells inside x; indices[n,c,p,q] =
          h*W + w of the first maximum in row-major order (a NaN wins, the last
          of several; a window of -inf points at its first cell inside x), as in
          PyTorch; dx[h,w] = sum of dy over the windows whose index points at (h,w).
    avg:  y = (1/D) * sum over the window of the zero-padded x; dx[h,w] = sum over
          the windows containing (h,w) of dy / D, where D is
            divisor_override                   if given, else
            the window's cells inside the padded input (it is clipped at H + ph,
            W + pw)                            if count_include_pad, else
            the window's cells inside x.

Here the arguments are checked and the geometry computed; the device computes
the windows (gpucnn.backend.ops_for): on the CPU one window tap at a time over
all windows (gpucnn/backends/cpu/pool.py); on a GPU the gather kernels of
kernels/max_pool2d.cu and avg_pool2d.cu (gpucnn/backends/cuda/pool.py): one
thread per output (forward) or per input pixel (backward), in a fixed order.

max_forward/max_backward/avg_forward/avg_backward take a PoolGeometry: a layer
parses its arguments once (arguments()) and computes the geometry once per input
shape (geometry_for()); max_pool2d(...) and friends do both for each call. The
forwards return (y, ctx) and the backwards take ctx: what the backward pass needs
of the forward's.
"""
from collections import namedtuple

import numpy

from .. import backend, validate
from ..backends.geometry import PoolGeometry, first_inside
from . import _checks

__all__ = ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "PoolGeometry", "PoolArguments", "PoolContext", "arguments", "geometry",
           "geometry_for", "max_forward", "max_backward", "avg_forward", "avg_backward"]

PoolArguments = namedtuple(
    "PoolArguments", "R S sh sw ph pw dh dw ceil_mode count_include_pad divisor_override")
PoolContext = namedtuple("PoolContext", "g indices")
PoolContext.__doc__ = """What a pooling's backward pass needs of its forward pass: the
PoolGeometry g and, for max pooling, the winners' indices (None for average pooling)."""


def arguments(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
              count_include_pad=True, divisor_override=None):
    """Validate a pooling's arguments (all but the input) and return them as PoolArguments."""
    R, S = _checks.pair(kernel_size, "kernel_size")
    sh, sw = (R, S) if stride is None else _checks.pair(stride, "stride")
    ph, pw = _checks.pair(padding, "padding", minimum=0)
    dh, dw = _checks.pair(dilation, "dilation")
    if ph > R // 2 or pw > S // 2:
        raise ValueError(f"padding {padding!r} must be at most half of kernel_size "
                         f"{(R, S)} (PyTorch's rule), i.e. at most {(R // 2, S // 2)}")
    validate.boolean(ceil_mode, "ceil_mode")
    validate.boolean(count_include_pad, "count_include_pad")
    if divisor_override is not None:
        divisor_override = validate.integer(divisor_override, "divisor_override",
                                            error=TypeError, what="None or a nonzero int")
        if divisor_override == 0 or abs(divisor_override) >= 2 ** 31:
            raise ValueError(f"divisor_override must be a nonzero int below 2**31 in "
                             f"magnitude, got {divisor_override}")
    return PoolArguments(R, S, sh, sw, ph, pw, dh, dw, ceil_mode, count_include_pad,
                         divisor_override)


def geometry(x_or_shape, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
             count_include_pad=True, divisor_override=None, name="input"):
    """Validate a pooling's arguments and return its PoolGeometry.

    x_or_shape: the input array, or its shape (N, C, H, W) as a tuple.
    """
    return geometry_for(x_or_shape, arguments(kernel_size, stride, padding, dilation, ceil_mode,
                                              count_include_pad, divisor_override), name)


def geometry_for(x_or_shape, a, name="input"):
    """The PoolGeometry of checked PoolArguments a for an input (array or shape)."""
    if isinstance(x_or_shape, tuple):
        N, C, H, W = _checks.nchw_shape(x_or_shape, name)
    else:
        _checks.float_array(x_or_shape, name, ndim=4)
        N, C, H, W = _checks.nchw_shape(tuple(x_or_shape.shape), f"{name} shape")
    P = _checks.output_size(H, a.R, a.sh, 2 * a.ph, a.dh, a.ceil_mode, name="output height")
    Q = _checks.output_size(W, a.S, a.sw, 2 * a.pw, a.dw, a.ceil_mode, name="output width")
    # A dilated window can step over the whole input (all of its taps in the
    # padding); PyTorch then returns -inf and an index outside the input.
    for axis, size, out, step, pad, d, taps in (("height", H, P, a.sh, a.ph, a.dh, a.R),
                                                ("width", W, Q, a.sw, a.pw, a.dw, a.S)):
        starts = numpy.arange(out) * step - pad
        empty = first_inside(starts, size, d, taps) == taps
        if empty.any():
            raise ValueError(
                f"kernel_size {(a.R, a.S)} with dilation {(a.dh, a.dw)}, stride {(a.sh, a.sw)} "
                f"and padding {(a.ph, a.pw)} puts every cell of window "
                f"{int(numpy.argmax(empty))} along the {axis} ({size}) outside the input; "
                "every window needs a cell inside it")
    return PoolGeometry(N, C, H, W, a.R, a.S, P, Q, a.sh, a.sw, a.ph, a.pw, a.dh, a.dw,
                        a.count_include_pad, a.divisor_override)


def _check_grad(dy, g, name="grad_output"):
    _checks.float_array(dy, name, ndim=4)
    _checks.shape_is(dy, name, (g.N, g.C, g.P, g.Q))


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """(y, indices): the window maxima and the flat position h*W + w of each winner.

    PyTorch's argument order (torch.nn.functional.max_pool2d with return_indices=True).
    """
    y, ctx = max_forward(x, geometry(x, kernel_size, stride, padding, dilation, ceil_mode))
    return y, ctx.indices


def max_forward(x, g):
    """(y, ctx) of max pooling x, for a checked PoolGeometry g of x."""
    xp = backend.get_array_module(x)
    y, indices = backend.ops_for(xp).max_pool2d_forward(x, g)
    return y, PoolContext(g, indices)


def max_pool2d_backward(dy, indices, input_shape, kernel_size=None, stride=None, padding=0,
                        dilation=1, ceil_mode=False):
    """dx of shape input_shape: each dy[n,c,p,q] goes to the pixel indices[n,c,p,q].

    Pass the forward's kernel_size/stride/padding/dilation/ceil_mode (as
    MaxPool2D does) to add up, in a fixed order, what the windows covering each
    pixel send it; without them every device routes dy through a histogram of
    the indices (on a GPU that histogram uses atomics, so with overlapping
    windows its last bit may vary).
    """
    N, C, H, W = _checks.nchw_shape(input_shape)
    _checks.float_array(dy, "grad_output", ndim=4)
    if not hasattr(indices, "dtype") or indices.dtype.kind not in "iu":
        raise TypeError(f"indices must be an integer array, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    _checks.shape_is(indices, "indices", dy.shape)
    if dy.shape[:2] != (N, C):
        raise ValueError(f"grad_output has shape {tuple(dy.shape)} but input_shape is "
                         f"{(N, C, H, W)}; batch and channels must match")
    if kernel_size is not None:
        g = geometry((N, C, H, W), kernel_size, stride, padding, dilation, ceil_mode,
                     name="input_shape")
        return max_backward(dy, PoolContext(g, indices))
    xp = backend.get_array_module(dy, indices)
    flat = indices + xp.arange(N * C, dtype=xp.int64).reshape(N, C, 1, 1) * (H * W)
    dx = xp.bincount(flat.ravel(), weights=dy.ravel(), minlength=N * C * H * W)
    return dx.astype(dy.dtype, copy=False).reshape(N, C, H, W)


def max_backward(dy, ctx):
    """dx of max pooling for the PoolContext of its forward pass; dy is checked here."""
    g, indices = ctx.g, ctx.indices
    _check_grad(dy, g)
    _checks.shape_is(indices, "indices", dy.shape)
    xp = backend.get_array_module(dy, indices)
    return backend.ops_for(xp).max_pool2d_backward(dy, indices, g)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """y[n,c,p,q] = the window's sum over the zero-padded input / D (see the module
    docstring); torch.nn.functional.avg_pool2d's arguments."""
    return avg_forward(x, geometry(x, kernel_size, stride, padding, 1, ceil_mode,
                                   count_include_pad, divisor_override))[0]


def avg_forward(x, g):
    """(y, ctx) of average pooling x, for a checked PoolGeometry g of x."""
    xp = backend.get_array_module(x)
    return backend.ops_for(xp).avg_pool2d_forward(x, g), PoolContext(g, None)


def avg_pool2d_backward(dy, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    """dx of shape input_shape: each window's dy / D shared equally over its cells."""
    g = geometry(tuple(input_shape) if isinstance(input_shape, list) else input_shape,
                 kernel_size, stride, padding, 1, ceil_mode, count_include_pad,
                 divisor_override, name="input_shape")
    return avg_backward(dy, PoolContext(g, None))


def avg_backward(dy, ctx):
    """dx of average pooling for the PoolContext of its forward pass; dy is checked here."""
    _check_grad(dy, ctx.g)
    xp = backend.get_array_module(dy)
    return backend.ops_for(xp).avg_pool2d_backward(dy, ctx.g)
