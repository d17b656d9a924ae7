"""The CPU's pooling passes: one window tap at a time over all windows (NumPy).

Every function takes checked NumPy arrays and a PoolGeometry g. A sample's
outputs depend on that sample alone, so the batch is shared out between gpucnn's
CPU threads (threads.py) with the same results on any thread count.
"""
import numpy

from ..geometry import first_inside
from . import threads


def _padded_size(g):
    """(Hp, Wp): the padded input that holds every window, ceil_mode's last one too."""
    return (max(g.H + 2 * g.ph, (g.P - 1) * g.sh + g.dh * (g.R - 1) + 1),
            max(g.W + 2 * g.pw, (g.Q - 1) * g.sw + g.dw * (g.S - 1) + 1))


def _padded(x, g, value):
    """x padded (top/left by the padding, bottom/right to _padded_size)."""
    Hp, Wp = _padded_size(g)
    return numpy.pad(x, ((0, 0), (0, 0), (g.ph, Hp - g.H - g.ph), (g.pw, Wp - g.W - g.pw)),
                     constant_values=value)


def _cells(a, g, r, s):
    """Tap (r, s) of every window: a strided (N, C, P, Q) view of padded a."""
    h, w = r * g.dh, s * g.dw
    return a[:, :, h:h + g.sh * (g.P - 1) + 1:g.sh, w:w + g.sw * (g.Q - 1) + 1:g.sw]


def max_forward(x, g):
    """(y, indices): the window maxima and the flat position h*W + w of each winner."""
    y = numpy.empty((g.N, g.C, g.P, g.Q), dtype=x.dtype)
    indices = numpy.empty((g.N, g.C, g.P, g.Q), dtype=numpy.int64)  # like PyTorch's indices

    def samples(n0, n1):  # a sample's outputs depend on that sample alone
        y[n0:n1], indices[n0:n1] = _max_scan(x[n0:n1], g)
    threads.ranges(numpy, samples, g.N)
    return y, indices


def _max_scan(x, g):
    """(y, indices) of max pooling x, a range of samples of the batch g describes."""
    # PyTorch's scan, one window tap o = r*S + s at a time over all windows at
    # once: a cell wins when it beats the best so far (so the first maximum
    # stays) or is NaN (so the last NaN wins); np.maximum keeps NaN. Padding is
    # -inf. Wins come at increasing o, so the winner is the largest o that won.
    xpad = _padded(x, g, -numpy.inf) if _padded_size(g) != (g.H, g.W) else x
    has_nan = bool(numpy.isnan(x).any())
    tap_type = numpy.int16 if g.R * g.S <= 32767 else numpy.int32
    y = arg = None
    for r in range(g.R):  # a loop over window taps, not pixels
        for s in range(g.S):
            v = _cells(xpad, g, r, s)
            if y is None:
                y, arg = v.copy(), numpy.zeros(v.shape, dtype=tap_type)
                continue
            better = v > y
            if has_nan:
                better |= numpy.isnan(v)
            numpy.maximum(y, v, out=y)
            numpy.maximum(arg, better * tap_type(r * g.S + s), out=arg)
    # the winner's flat position: its offset within the window plus the window's corner
    offset = (numpy.arange(g.R)[:, None] * (g.dh * g.W) + numpy.arange(g.S) * g.dw).ravel()
    h0, w0 = numpy.arange(g.P) * g.sh - g.ph, numpy.arange(g.Q) * g.sw - g.pw
    indices = offset[arg] + (h0[:, None] * g.W + w0)  # int64, like PyTorch's indices
    if xpad is not x:
        # Only a window of -inf can have kept a padded cell; PyTorch then
        # points at the window's first cell inside the input.
        lost = y == -numpy.inf
        if lost.any():
            fh = numpy.arange(g.P) * g.sh - g.ph
            fw = numpy.arange(g.Q) * g.sw - g.pw
            fh = fh + first_inside(fh, g.H, g.dh, g.R) * g.dh
            fw = fw + first_inside(fw, g.W, g.dw, g.S) * g.dw
            first = numpy.asarray(fh[:, None] * g.W + fw)
            indices = numpy.where(lost, first, indices)
    return y, indices


def max_backward(dy, indices, g):
    """dx (N, C, H, W): dy[n,c,p,q] added at the pixel indices[n,c,p,q] of its plane."""
    # ufunc.at adds unbuffered, one output after another in (n, c, p, q) order, so
    # winners shared by overlapping or dilated windows add up in a fixed order,
    # the order of PyTorch's CPU kernel (same bits in float32 too). NumPy >= 1.25
    # gives it a fast path, faster than bincount or an indexed add per window
    # phase.
    # Each sample's pixels take adds from that sample's windows only: the samples
    # can be shared out between threads with the same order of adds.
    planes = numpy.arange(g.N * g.C, dtype=numpy.int64).reshape(g.N, g.C, 1, 1) * (g.H * g.W)
    dx = numpy.zeros(g.N * g.C * g.H * g.W, dtype=dy.dtype)

    def samples(n0, n1):  # each range adds into its own samples' pixels only
        numpy.add.at(dx, (indices[n0:n1] + planes[n0:n1]).ravel(), dy[n0:n1].ravel())
    threads.ranges(numpy, samples, g.N)
    return dx.reshape(g.N, g.C, g.H, g.W)


def _divisors(g, dtype):
    """D[p, q], the divisor of each window (see gpucnn.functional.pool)."""
    if g.divisor_override is not None:
        return numpy.dtype(dtype).type(g.divisor_override)
    h0 = numpy.arange(g.P) * g.sh - g.ph
    w0 = numpy.arange(g.Q) * g.sw - g.pw
    if g.count_include_pad:  # cells inside the padded input
        dh = numpy.minimum(h0 + g.R, g.H + g.ph) - h0
        dw = numpy.minimum(w0 + g.S, g.W + g.pw) - w0
    else:  # cells inside x
        dh = numpy.minimum(h0 + g.R, g.H) - numpy.maximum(h0, 0)
        dw = numpy.minimum(w0 + g.S, g.W) - numpy.maximum(w0, 0)
    return (dh[:, None] * dw[None, :]).astype(dtype)


def avg_forward(x, g):
    """y (N, C, P, Q): each window's sum over the zero-padded x, divided by D."""
    unpadded = _padded_size(g) == (g.H, g.W)
    xpad = x if unpadded else _padded(x, g, 0)
    y = None
    for r in range(g.R):  # loop over window taps, not pixels
        for s in range(g.S):
            v = _cells(xpad, g, r, s)
            if y is None:
                y = numpy.array(v, dtype=x.dtype, copy=True)
            else:
                y += v
    y /= _divisors(g, x.dtype)
    return y


def avg_backward(dy, g):
    """dx (N, C, H, W): each window's dy / D added to each of its cells."""
    share = dy / _divisors(g, dy.dtype)
    dxp = numpy.zeros((g.N, g.C, *_padded_size(g)), dtype=dy.dtype)
    for r in range(g.R):
        for s in range(g.S):
            _cells(dxp, g, r, s)[...] += share
    if _padded_size(g) == (g.H, g.W):
        return dxp
    return numpy.ascontiguousarray(dxp[:, :, g.ph:g.ph + g.H, g.pw:g.pw + g.W])
