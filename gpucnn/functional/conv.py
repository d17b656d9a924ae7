"""2-D convolution (cross-correlation, as PyTorch computes it), forward and backward.

Shapes: x (N, C, H, W), weight (K, C/g, R, S), bias (K,), y (N, K, P, Q).

    y[n,k,p,q]    = b[k] + sum_{c',r,s} xp[n, G(k)*C/g + c', p*sh + r*dh, q*sw + s*dw] * w[k,c',r,s]
    db[k]         = sum_{n,p,q} dy[n,k,p,q]
    dw[k,c',r,s]  = sum_{n,p,q} dy[n,k,p,q] * xp[n, G(k)*C/g + c', p*sh + r*dh, q*sw + s*dw]
    dx            = dy convolved with the 180-degree-rotated, channel-swapped filters
                    (a transposed convolution: dy spread out by the stride)

On the CPU (and for the GPU forward) the sums are matrix products over an
im2col matrix: cols[g, (c',r,s), (n,p,q)] = xp[n, g*C/g + c', p*sh + r*dh, q*sw + s*dw].
Then y = w @ cols, dw = dy @ cols^T, and dcols = w^T @ dy, whose columns are
added back onto the input positions they were read from (col2im); adding
dcols[c',r,s] at xp[p*sh + r*dh, q*sw + s*dw] is exactly the flipped-filter
convolution above, one kernel offset (r,s) at a time. On the GPU the two
backward passes are the gather kernels in kernels/conv2d_backward.cu.
"""
from collections import namedtuple

from .. import backend
from . import _checks

ConvGeometry = namedtuple(
    "ConvGeometry", "N C H W K R S P Q sh sw pt pb pl pr dh dw groups")


def padding_amounts(padding, R, S, stride, dilation):
    """Padding argument -> (top, bottom, left, right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {stride} "
                                 "(PyTorch does not support it either)")
            # PyTorch: total = d*(k-1), the extra odd pixel goes to the bottom/right.
            th, tw = dilation[0] * (R - 1), dilation[1] * (S - 1)
            return th // 2, th - th // 2, tw // 2, tw - tw // 2
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = _checks.pair(padding, "padding", minimum=0)
    return ph, ph, pw, pw


def geometry(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Validate a convolution's arguments and return its ConvGeometry."""
    _checks.float_array(x, "input", ndim=4)
    _checks.float_array(weight, "weight", ndim=4)
    _checks.same_dtype("input", x, weight=weight, bias=bias)
    backend.get_array_module(x, weight, bias)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    if C % groups or K % groups:
        raise ValueError(f"groups={groups} must divide both in_channels ({C}) and "
                         f"out_channels ({K})")
    if Cg * groups != C:
        raise ValueError(f"weight of shape {tuple(weight.shape)} with groups={groups} expects "
                         f"{Cg * groups} input channels (weight.shape[1] * groups), but input of "
                         f"shape {tuple(x.shape)} has {C}")
    if bias is not None:
        _checks.float_array(bias, "bias", ndim=1)
        _checks.shape_is(bias, "bias", (K,))
    sh, sw = _checks.pair(stride, "stride")
    dh, dw = _checks.pair(dilation, "dilation")
    pt, pb, pl, pr = padding_amounts(padding, R, S, (sh, sw), (dh, dw))
    P = _checks.output_size(H, R, sh, pt + pb, dh, name="output height")
    Q = _checks.output_size(W, S, sw, pl + pr, dw, name="output width")
    return ConvGeometry(N, C, H, W, K, R, S, P, Q, sh, sw, pt, pb, pl, pr, dh, dw, groups)


def _pad(xp, x, g):
    if not (g.pt or g.pb or g.pl or g.pr):
        return xp.ascontiguousarray(x)
    return xp.pad(x, ((0, 0), (0, 0), (g.pt, g.pb), (g.pl, g.pr)))


def _im2col(xp, x, g):
    """cols of shape (groups, C/g*R*S, N*P*Q); see the module docstring."""
    xpad = _pad(xp, x, g)
    sN, sC, sH, sW = xpad.strides
    view = xp.lib.stride_tricks.as_strided(
        xpad, shape=(g.C, g.R, g.S, g.N, g.P, g.Q),
        strides=(sC, g.dh * sH, g.dw * sW, sN, g.sh * sH, g.sw * sW))
    cols = xp.ascontiguousarray(view)
    return cols.reshape(g.groups, (g.C // g.groups) * g.R * g.S, g.N * g.P * g.Q)


def _col2im(xp, dcols, g, dtype):
    """Add each column back onto the input pixel it came from; crop the padding."""
    Hp, Wp = g.H + g.pt + g.pb, g.W + g.pl + g.pr
    dcols = dcols.reshape(g.C, g.R, g.S, g.N, g.P, g.Q)
    dxp = xp.zeros((g.N, g.C, Hp, Wp), dtype=dtype)
    for r in range(g.R):  # a loop over kernel offsets, not pixels
        h0 = r * g.dh
        for s in range(g.S):
            w0 = s * g.dw
            dxp[:, :, h0:h0 + g.sh * (g.P - 1) + 1:g.sh, w0:w0 + g.sw * (g.Q - 1) + 1:g.sw] += \
                dcols[:, r, s].transpose(1, 0, 2, 3)
    return xp.ascontiguousarray(dxp[:, :, g.pt:g.pt + g.H, g.pl:g.pl + g.W])


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv2d(x, weight) + bias, PyTorch's torch.nn.functional.conv2d.

    x (N, C, H, W), weight (K, C/groups, R, S), bias (K,) or None -> y (N, K, P, Q).
    padding: int, pair, 'same' (stride 1) or 'valid'.
    """
    g = geometry(x, weight, bias, stride, padding, dilation, groups)
    xp = backend.get_array_module(x, weight, bias)
    cols = _im2col(xp, x, g)
    w2 = weight.reshape(g.groups, g.K // g.groups, -1)
    y = xp.matmul(w2, cols).reshape(g.K, g.N, g.P, g.Q).transpose(1, 0, 2, 3)
    out = xp.empty((g.N, g.K, g.P, g.Q), dtype=x.dtype)
    if bias is None:
        out[...] = y
    else:
        xp.add(y, bias.reshape(1, g.K, 1, 1), out=out)
    return out


def conv2d_backward(dy, x, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    need_input_grad=True):
    """Gradients of conv2d: (dx, dweight, dbias) given dy = dL/dy of shape (N, K, P, Q).

    need_input_grad=False skips dx (returned as None), as for a network's first layer.
    """
    g = geometry(x, weight, None, stride, padding, dilation, groups)
    _checks.float_array(dy, "grad_output", ndim=4)
    _checks.same_dtype("input", x, grad_output=dy)
    _checks.shape_is(dy, "grad_output", (g.N, g.K, g.P, g.Q))
    backend.get_array_module(dy, x, weight)
    dx = backward_data(dy, weight, g) if need_input_grad else None
    return dx, backward_filter(dy, x, g), backward_bias(dy)


# The three passes below take checked arguments and a ConvGeometry; each picks
# the device's implementation: matrix products here, CUDA kernels on a GPU.

def _grouped_dy(xp, dy, g):
    """dy (N, K, P, Q) -> (groups, K/groups, N*P*Q), the layout of the im2col products."""
    G = g.groups
    return xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(G, g.K // G, -1)


def backward_data(dy, weight, g):
    """dx (N, C, H, W): dcols = w^T @ dy, added back onto the input (col2im)."""
    xp = backend.get_array_module(dy, weight)
    if xp is not backend.numpy:
        return _cuda_kernels().conv2d_backward_data(dy, weight, g)
    w2 = weight.reshape(g.groups, g.K // g.groups, -1)
    return _col2im(xp, xp.matmul(w2.transpose(0, 2, 1), _grouped_dy(xp, dy, g)), g, dy.dtype)


def backward_filter(dy, x, g):
    """dweight (K, C/groups, R, S) = dy @ cols^T."""
    xp = backend.get_array_module(dy, x)
    if xp is not backend.numpy:
        return _cuda_kernels().conv2d_backward_filter(dy, x, g)
    cols = _im2col(xp, x, g)
    dweight = xp.matmul(_grouped_dy(xp, dy, g), cols.transpose(0, 2, 1))
    return dweight.reshape(g.K, g.C // g.groups, g.R, g.S)


def backward_bias(dy):
    """dbias (K,) = dy summed over n, p, q."""
    xp = backend.get_array_module(dy)
    if xp is not backend.numpy:
        return _cuda_kernels().conv2d_backward_bias(dy)
    return dy.sum(axis=(0, 2, 3))


def _cuda_kernels():
    from .. import cuda
    return cuda.kernels()
