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

max_forward/max_backward/avg_forward/avg_backward take a PoolGeometry: a layer
parses its arguments once (arguments()) and computes the geometry once per input
shape (geometry_for()); max_pool2d(...) and friends do both for each call.
On the CPU the sums run one window tap at a time over all windows (NumPy); on
a GPU they are the gather kernels of kernels/max_pool2d.cu and avg_pool2d.cu:
one thread per output (forward) or per input pixel (backward), fixed order.
"""
import numbers
from collections import namedtuple

import numpy

from .. import backend
from ..backends.cpu import threads as cpu_threads
from ..backends.cuda import kernels as cuda
from . import _checks

PoolGeometry = namedtuple(
    "PoolGeometry", "N C H W R S P Q sh sw ph pw dh dw count_include_pad divisor_override",
    defaults=(1, 1, True, None))
PoolArguments = namedtuple(
    "PoolArguments", "R S sh sw ph pw dh dw ceil_mode count_include_pad divisor_override")


def _first_inside(start, size, step, taps):
    """Per window start (an int array): the first tap t with 0 <= start + t*step < size,
    or taps if there is none."""
    t = numpy.maximum(0, -(start // step))  # ceil(-start / step) for start < 0
    return numpy.where((t < taps) & (start + t * step < size), t, taps)


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
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    if not isinstance(count_include_pad, bool):
        raise TypeError(f"count_include_pad must be a bool, got {count_include_pad!r}")
    if divisor_override is not None:
        if isinstance(divisor_override, bool) or not isinstance(divisor_override,
                                                                numbers.Integral):
            raise TypeError(f"divisor_override must be None or a nonzero int, got "
                            f"{divisor_override!r}")
        if divisor_override == 0 or abs(divisor_override) >= 2 ** 31:
            raise ValueError(f"divisor_override must be a nonzero int below 2**31 in "
                             f"magnitude, got {divisor_override}")
        divisor_override = int(divisor_override)
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
        empty = _first_inside(starts, size, d, taps) == taps
        if empty.any():
            raise ValueError(
                f"kernel_size {(a.R, a.S)} with dilation {(a.dh, a.dw)}, stride {(a.sh, a.sw)} "
                f"and padding {(a.ph, a.pw)} puts every cell of window "
                f"{int(numpy.argmax(empty))} along the {axis} ({size}) outside the input; "
                "every window needs a cell inside it")
    return PoolGeometry(N, C, H, W, a.R, a.S, P, Q, a.sh, a.sw, a.ph, a.pw, a.dh, a.dw,
                        a.count_include_pad, a.divisor_override)


def _padded_size(g):
    """(Hp, Wp): the padded input that holds every window, ceil_mode's last one too."""
    return (max(g.H + 2 * g.ph, (g.P - 1) * g.sh + g.dh * (g.R - 1) + 1),
            max(g.W + 2 * g.pw, (g.Q - 1) * g.sw + g.dw * (g.S - 1) + 1))


def _padded(xp, x, g, value):
    """x padded (top/left by the padding, bottom/right to _padded_size)."""
    Hp, Wp = _padded_size(g)
    return xp.pad(x, ((0, 0), (0, 0), (g.ph, Hp - g.H - g.ph), (g.pw, Wp - g.W - g.pw)),
                  constant_values=value)


def _cells(a, g, r, s):
    """Tap (r, s) of every window: a strided (N, C, P, Q) view of padded a."""
    h, w = r * g.dh, s * g.dw
    return a[:, :, h:h + g.sh * (g.P - 1) + 1:g.sh, w:w + g.sw * (g.Q - 1) + 1:g.sw]


def _check_grad(dy, g, name="grad_output"):
    _checks.float_array(dy, name, ndim=4)
    _checks.shape_is(dy, name, (g.N, g.C, g.P, g.Q))


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """(y, indices): the window maxima and the flat position h*W + w of each winner.

    PyTorch's argument order (torch.nn.functional.max_pool2d with return_indices=True).
    """
    return max_forward(x, geometry(x, kernel_size, stride, padding, dilation, ceil_mode))


def max_forward(x, g):
    """max_pool2d for a checked PoolGeometry g of x."""
    xp = backend.get_array_module(x)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        return kernels.max_pool2d_forward(x, g)
    y = xp.empty((g.N, g.C, g.P, g.Q), dtype=x.dtype)
    indices = xp.empty((g.N, g.C, g.P, g.Q), dtype=xp.int64)  # like PyTorch's indices

    def samples(n0, n1):  # a sample's outputs depend on that sample alone
        y[n0:n1], indices[n0:n1] = _max_scan(xp, x[n0:n1], g)
    cpu_threads.ranges(xp, samples, g.N)
    return y, indices


def _max_scan(xp, x, g):
    """(y, indices) of max pooling x, a range of samples of the batch g describes."""
    # PyTorch's scan, one window tap o = r*S + s at a time over all windows at
    # once: a cell wins when it beats the best so far (so the first maximum
    # stays) or is NaN (so the last NaN wins); np.maximum keeps NaN. Padding is
    # -inf. Wins come at increasing o, so the winner is the largest o that won.
    xpad = _padded(xp, x, g, -xp.inf) if _padded_size(g) != (g.H, g.W) else x
    has_nan = bool(xp.isnan(x).any())
    tap_type = xp.int16 if g.R * g.S <= 32767 else xp.int32
    y = arg = None
    for r in range(g.R):  # a loop over window taps, not pixels
        for s in range(g.S):
            v = _cells(xpad, g, r, s)
            if y is None:
                y, arg = v.copy(), xp.zeros(v.shape, dtype=tap_type)
                continue
            better = v > y
            if has_nan:
                better |= xp.isnan(v)
            xp.maximum(y, v, out=y)
            xp.maximum(arg, better * tap_type(r * g.S + s), out=arg)
    # the winner's flat position: its offset within the window plus the window's corner
    offset = (xp.arange(g.R)[:, None] * (g.dh * g.W) + xp.arange(g.S) * g.dw).ravel()
    h0, w0 = xp.arange(g.P) * g.sh - g.ph, xp.arange(g.Q) * g.sw - g.pw
    indices = offset[arg] + (h0[:, None] * g.W + w0)  # int64, like PyTorch's indices
    if xpad is not x:
        # Only a window of -inf can have kept a padded cell; PyTorch then
        # points at the window's first cell inside the input.
        lost = y == -xp.inf
        if lost.any():
            fh = numpy.arange(g.P) * g.sh - g.ph
            fw = numpy.arange(g.Q) * g.sw - g.pw
            fh = fh + _first_inside(fh, g.H, g.dh, g.R) * g.dh
            fw = fw + _first_inside(fw, g.W, g.dw, g.S) * g.dw
            first = xp.asarray(fh[:, None] * g.W + fw)
            indices = xp.where(lost, first, indices)
    return y, indices


def max_pool2d_backward(dy, indices, input_shape, kernel_size=None, stride=None, padding=0,
                        dilation=1, ceil_mode=False):
    """dx of shape input_shape: each dy[n,c,p,q] goes to the pixel indices[n,c,p,q].

    Pass the forward's kernel_size/stride/padding/dilation/ceil_mode (as
    MaxPool2D does) to gather, deterministically, over the windows covering each
    pixel; without them the CPU and GPU route through a histogram of the
    indices (on the GPU that histogram uses atomics, so with overlapping windows
    its last bit may vary).
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
        return max_backward(dy, indices, g)
    xp = backend.get_array_module(dy, indices)
    flat = indices + xp.arange(N * C, dtype=xp.int64).reshape(N, C, 1, 1) * (H * W)
    dx = xp.bincount(flat.ravel(), weights=dy.ravel(), minlength=N * C * H * W)
    return dx.astype(dy.dtype, copy=False).reshape(N, C, H, W)


def max_backward(dy, indices, g):
    """max_pool2d_backward for the forward's PoolGeometry g."""
    _check_grad(dy, g)
    _checks.shape_is(indices, "indices", dy.shape)
    xp = backend.get_array_module(dy, indices)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        return kernels.max_pool2d_backward(dy, indices, g)
    # ufunc.at adds unbuffered, one output after another in (n, c, p, q) order, so
    # winners shared by overlapping or dilated windows add up in a fixed order,
    # the order of PyTorch's CPU kernel (same bits in float32 too). NumPy >= 1.25
    # gives it a fast path: ~3x faster than bincount or an indexed add per
    # window phase on a 3x3 stride-2 pool.
    # Each sample's pixels take adds from that sample's windows only: the samples
    # can be shared out between threads with the same order of adds.
    planes = xp.arange(g.N * g.C, dtype=xp.int64).reshape(g.N, g.C, 1, 1) * (g.H * g.W)
    dx = xp.zeros(g.N * g.C * g.H * g.W, dtype=dy.dtype)

    def samples(n0, n1):  # each range adds into its own samples' pixels only
        xp.add.at(dx, (indices[n0:n1] + planes[n0:n1]).ravel(), dy[n0:n1].ravel())
    cpu_threads.ranges(xp, samples, g.N)
    return dx.reshape(g.N, g.C, g.H, g.W)


def _divisors(xp, g, dtype):
    """D[p, q], the divisor of each window (see the module docstring)."""
    if g.divisor_override is not None:
        return numpy.dtype(dtype).type(g.divisor_override)
    h0 = xp.arange(g.P) * g.sh - g.ph
    w0 = xp.arange(g.Q) * g.sw - g.pw
    if g.count_include_pad:  # cells inside the padded input
        dh = xp.minimum(h0 + g.R, g.H + g.ph) - h0
        dw = xp.minimum(w0 + g.S, g.W + g.pw) - w0
    else:  # cells inside x
        dh = xp.minimum(h0 + g.R, g.H) - xp.maximum(h0, 0)
        dw = xp.minimum(w0 + g.S, g.W) - xp.maximum(w0, 0)
    return (dh[:, None] * dw[None, :]).astype(dtype)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """y[n,c,p,q] = the window's sum over the zero-padded input / D (see the module
    docstring); torch.nn.functional.avg_pool2d's arguments."""
    return avg_forward(x, geometry(x, kernel_size, stride, padding, 1, ceil_mode,
                                   count_include_pad, divisor_override))


def avg_forward(x, g):
    """avg_pool2d for a checked PoolGeometry g of x."""
    xp = backend.get_array_module(x)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        return kernels.avg_pool2d_forward(x, g)
    unpadded = _padded_size(g) == (g.H, g.W)
    xpad = x if unpadded else _padded(xp, x, g, 0)
    y = None
    for r in range(g.R):  # loop over window taps, not pixels
        for s in range(g.S):
            v = _cells(xpad, g, r, s)
            if y is None:
                y = xp.array(v, dtype=x.dtype, copy=True)
            else:
                y += v
    y /= _divisors(xp, g, x.dtype)
    return y


def avg_pool2d_backward(dy, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    """dx of shape input_shape: each window's dy / D shared equally over its cells."""
    g = geometry(tuple(input_shape) if isinstance(input_shape, list) else input_shape,
                 kernel_size, stride, padding, 1, ceil_mode, count_include_pad,
                 divisor_override, name="input_shape")
    return avg_backward(dy, g)


def avg_backward(dy, g):
    """avg_pool2d_backward for the forward's PoolGeometry g."""
    _check_grad(dy, g)
    xp = backend.get_array_module(dy)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        return kernels.avg_pool2d_backward(dy, g)
    share = dy / _divisors(xp, g, dy.dtype)
    dxp = xp.zeros((g.N, g.C, *_padded_size(g)), dtype=dy.dtype)
    for r in range(g.R):
        for s in range(g.S):
            _cells(dxp, g, r, s)[...] += share
    if _padded_size(g) == (g.H, g.W):
        return dxp
    return xp.ascontiguousarray(dxp[:, :, g.ph:g.ph + g.H, g.pw:g.pw + g.W])
