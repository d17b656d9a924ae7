"""Max and average pooling over (R, S) windows, forward and backward (PyTorch's rules).

Shapes: x (N, C, H, W) -> y (N, C, P, Q). The window of output (p, q) starts at
(p*sh - ph, q*sw - pw). ceil_mode rounds the output size up, as PyTorch does.

    max:  y[n,c,p,q] = max over the window; indices[n,c,p,q] = h*W + w of the
          first maximum in row-major order (a NaN wins, the last of several, as
          in PyTorch); dx[h,w] = sum of dy over
          the windows whose index points at (h,w).
    avg:  y = (1/D) * sum over the window of the zero-padded x, D = the window's
          positions inside the padded input (count_include_pad=True);
          dx[h,w] = sum over the windows containing (h,w) of dy / D.
"""
from collections import namedtuple

from .. import backend, cuda
from . import _checks

PoolGeometry = namedtuple("PoolGeometry", "N C H W R S P Q sh sw ph pw")


def geometry(x_or_shape, kernel_size, stride=None, padding=0, ceil_mode=False, name="input"):
    """Validate a pooling's arguments and return its PoolGeometry."""
    if isinstance(x_or_shape, tuple):
        N, C, H, W = _checks.nchw_shape(x_or_shape, name)
    else:
        _checks.float_array(x_or_shape, name, ndim=4)
        N, C, H, W = x_or_shape.shape
    R, S = _checks.pair(kernel_size, "kernel_size")
    sh, sw = (R, S) if stride is None else _checks.pair(stride, "stride")
    ph, pw = _checks.pair(padding, "padding", minimum=0)
    if ph > R // 2 or pw > S // 2:
        raise ValueError(f"padding {padding!r} must be at most half of kernel_size "
                         f"{(R, S)} (PyTorch's rule), i.e. at most {(R // 2, S // 2)}")
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    P = _checks.output_size(H, R, sh, 2 * ph, 1, ceil_mode, name="output height")
    Q = _checks.output_size(W, S, sw, 2 * pw, 1, ceil_mode, name="output width")
    return PoolGeometry(N, C, H, W, R, S, P, Q, sh, sw, ph, pw)


def _padded_size(g):
    """(Hp, Wp): the padded input that holds every window, ceil_mode's last one too."""
    return (max(g.H + 2 * g.ph, (g.P - 1) * g.sh + g.R),
            max(g.W + 2 * g.pw, (g.Q - 1) * g.sw + g.S))


def _padded(xp, x, g, value):
    """x padded (top/left by the padding, bottom/right to _padded_size)."""
    Hp, Wp = _padded_size(g)
    return xp.pad(x, ((0, 0), (0, 0), (g.ph, Hp - g.H - g.ph), (g.pw, Wp - g.W - g.pw)),
                  constant_values=value)


def _cells(a, g, r, s):
    """The cell at offset (r, s) of every window: a strided (N, C, P, Q) view of padded a."""
    return a[:, :, r:r + g.sh * (g.P - 1) + 1:g.sh, s:s + g.sw * (g.Q - 1) + 1:g.sw]


def _check_grad(dy, g, name="grad_output"):
    _checks.float_array(dy, name, ndim=4)
    _checks.shape_is(dy, name, (g.N, g.C, g.P, g.Q))


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """(y, indices): the window maxima and the flat position h*W + w of each winner."""
    g = geometry(x, kernel_size, stride, padding, ceil_mode)
    if g.R * g.S > 32767:
        raise ValueError(f"kernel_size {kernel_size!r} has {g.R * g.S} cells; at most 32767 "
                         "are supported")
    xp = backend.get_array_module(x)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        return kernels.max_pool2d_forward(x, g)
    # PyTorch's scan, one window offset o = r*S + s at a time over all windows at
    # once: a cell wins when it beats the best so far (so the first maximum
    # stays) or is NaN (so the last NaN wins); np.maximum keeps NaN. Padding is
    # -inf. Wins come at increasing o, so the winner is the largest o that won.
    xpad = _padded(xp, x, g, -xp.inf) if _padded_size(g) != (g.H, g.W) else x
    has_nan = bool(xp.isnan(x).any())
    y = arg = None
    for r in range(g.R):  # a loop over window offsets, not pixels
        for s in range(g.S):
            v = _cells(xpad, g, r, s)
            if y is None:
                y, arg = v.copy(), xp.zeros(v.shape, dtype=xp.int16)
                continue
            better = v > y
            if has_nan:
                better |= xp.isnan(v)
            xp.maximum(y, v, out=y)
            xp.maximum(arg, better * xp.int16(r * g.S + s), out=arg)
    # the winner's flat position: its offset within the window plus the window's corner
    offset = (xp.arange(g.R)[:, None] * g.W + xp.arange(g.S)).ravel()
    corner = (xp.arange(g.P) * g.sh - g.ph)[:, None] * g.W + (xp.arange(g.Q) * g.sw - g.pw)
    indices = offset[arg] + corner  # int64, like PyTorch's indices
    if xpad is not x:
        # Only a window of -inf can have kept a padded cell; PyTorch then
        # points at the window's first cell inside the input.
        lost = y == -xp.inf
        if lost.any():
            first = ((xp.maximum(xp.arange(g.P) * g.sh - g.ph, 0)[:, None] * g.W)
                     + xp.maximum(xp.arange(g.Q) * g.sw - g.pw, 0))
            indices = xp.where(lost, first, indices)
    return y, indices


def max_pool2d_backward(dy, indices, input_shape, kernel_size=None, stride=None, padding=0,
                        ceil_mode=False):
    """dx of shape input_shape: each dy[n,c,p,q] goes to the pixel indices[n,c,p,q].

    Pass the forward's kernel_size/stride/padding/ceil_mode (as MaxPool2D does)
    to let the GPU gather over the windows covering each pixel; without them
    the CPU and GPU route through a histogram of the indices (on the GPU that
    histogram uses atomics, so with overlapping windows its last bit may vary).
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
    xp = backend.get_array_module(dy, indices)
    if kernel_size is not None:
        g = geometry((N, C, H, W), kernel_size, stride, padding, ceil_mode)
        _check_grad(dy, g)
        kernels = cuda.kernels_for(xp)
        if kernels is not None:
            return kernels.max_pool2d_backward(dy, indices, g)
    planes = xp.arange(N * C, dtype=xp.int64).reshape(N, C, 1, 1) * (H * W)
    flat = indices + planes
    if kernel_size is None:
        dx = xp.bincount(flat.ravel(), weights=dy.ravel(), minlength=N * C * H * W)
        return dx.astype(dy.dtype, copy=False).reshape(N, C, H, W)
    # Windows mh = ceil(R/sh) rows (and mw columns) apart never overlap, so within
    # each of the mh*mw phases of (p mod mh, q mod mw) the winners are distinct
    # pixels and a plain indexed add is exact; the phases add up in a fixed order.
    mh, mw = -(-g.R // g.sh), -(-g.S // g.sw)
    dx = xp.zeros(N * C * H * W, dtype=dy.dtype)
    for a in range(mh):
        for b in range(mw):
            dx[flat[:, :, a::mh, b::mw].ravel()] += dy[:, :, a::mh, b::mw].ravel()
    return dx.reshape(N, C, H, W)


def _divisors(xp, g, dtype):
    """D[p, q]: window positions inside the padded input (PyTorch's pool_size)."""
    hs = xp.arange(g.P) * g.sh - g.ph
    ws = xp.arange(g.Q) * g.sw - g.pw
    dh = xp.minimum(hs + g.R, g.H + g.ph) - hs
    dw = xp.minimum(ws + g.S, g.W + g.pw) - ws
    return (dh[:, None] * dw[None, :]).astype(dtype)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """y[n,c,p,q] = mean of the window over the zero-padded input (count_include_pad=True)."""
    g = geometry(x, kernel_size, stride, padding, ceil_mode)
    xp = backend.get_array_module(x)
    xpad = _padded(xp, x, g, 0)
    y = xp.zeros((g.N, g.C, g.P, g.Q), dtype=x.dtype)
    for r in range(g.R):  # loop over window offsets, not pixels
        for s in range(g.S):
            y += _cells(xpad, g, r, s)
    y /= _divisors(xp, g, x.dtype)
    return y


def avg_pool2d_backward(dy, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False):
    """dx of shape input_shape: each window's dy / D shared equally over its pixels."""
    g = geometry(tuple(input_shape) if isinstance(input_shape, list) else input_shape,
                 kernel_size, stride, padding, ceil_mode, name="input_shape")
    _check_grad(dy, g)
    xp = backend.get_array_module(dy)
    share = dy / _divisors(xp, g, dy.dtype)
    dxp = xp.zeros((g.N, g.C, *_padded_size(g)), dtype=dy.dtype)
    for r in range(g.R):
        for s in range(g.S):
            _cells(dxp, g, r, s)[...] += share
    return xp.ascontiguousarray(dxp[:, :, g.ph:g.ph + g.H, g.pw:g.pw + g.W])
