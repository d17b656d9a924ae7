"""2-D convolution (cross-correlation, as PyTorch computes it), forward and backward.

Shapes: x (N, C, H, W), weight (K, C/g, R, S), bias (K,), y (N, K, P, Q).

    y[n,k,p,q]    = b[k] + sum_{c',r,s} xp[n, G(k)*C/g + c', p*sh + r*dh, q*sw + s*dw] * w[k,c',r,s]
    db[k]         = sum_{n,p,q} dy[n,k,p,q]
    dw[k,c',r,s]  = sum_{n,p,q} dy[n,k,p,q] * xp[n, G(k)*C/g + c', p*sh + r*dh, q*sw + s*dw]
    dx            = dy convolved with the 180-degree-rotated, channel-swapped filters
                    (a transposed convolution: dy spread out by the stride)

xp is x zero-padded and G(k) = k // (K/g) the group of output channel k.

Here the arguments are checked and the geometry computed; the device computes
the sums (gpucnn.backend.ops_for): on the CPU as matrix products over an im2col
matrix, a few samples at a time (gpucnn/backends/cpu/conv.py); on the GPU as
implicit-GEMM kernels that gather the same matrices tile by tile into shared
memory (kernels/conv2d.cu, launched by gpucnn/backends/cuda/conv.py), the bias
gradient a fixed-order reduction (kernels/conv2d_reduce.cu).

forward/backward take a ConvGeometry: a layer parses its arguments once
(arguments()) and computes the geometry once per input shape (geometry_for());
conv2d(...) and conv2d_backward(...) do both at each call. forward returns
(y, ctx) and backward takes ctx: what the backward pass needs of the forward's.
"""
from collections import namedtuple

from .. import backend, validate
from ..backends.geometry import ConvGeometry
from . import _checks

__all__ = ["conv2d", "conv2d_backward", "ConvGeometry", "ConvArguments", "ConvContext",
           "arguments", "geometry", "geometry_for", "padding_amounts", "forward", "backward",
           "backward_data", "backward_filter", "backward_bias"]

ConvArguments = namedtuple("ConvArguments", "sh sw padding dh dw groups")
ConvArguments.__doc__ = """A convolution's checked arguments but the arrays: stride (sh, sw),
padding ('same', 'valid' or a pair (ph, pw)), dilation (dh, dw) and groups."""
ConvContext = namedtuple("ConvContext", "x weight g source")
ConvContext.__doc__ = """What a convolution's backward pass needs of its forward pass: the
input x, the weight, the ConvGeometry g, and source: what the device's forward pass
built that backward-filter reads again (the CPU's padded input), or None."""


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


def arguments(stride=1, padding=0, dilation=1, groups=1):
    """Validate a convolution's arguments (all but the arrays) and return them as
    ConvArguments; padding stays 'same' or 'valid' (its amounts depend on the
    filter size), else becomes a pair."""
    groups = validate.positive_int(groups, "groups")
    sh, sw = _checks.pair(stride, "stride")
    dh, dw = _checks.pair(dilation, "dilation")
    if isinstance(padding, str):
        padding_amounts(padding, 1, 1, (sh, sw), (dh, dw))  # the word, and 'same's stride
    else:
        padding = _checks.pair(padding, "padding", minimum=0)
    return ConvArguments(sh, sw, padding, dh, dw, groups)


def geometry(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Validate a convolution's arguments and return its ConvGeometry."""
    return geometry_for(x, weight, bias, arguments(stride, padding, dilation, groups))


def geometry_for(x, weight, bias, a):
    """The ConvGeometry of checked ConvArguments a for these arrays (checked here)."""
    _checks.float_array(x, "input", ndim=4)
    _checks.float_array(weight, "weight", ndim=4)
    _checks.same_dtype("input", x, weight=weight, bias=bias)
    backend.get_array_module(x, weight, bias)
    N, C, H, W = x.shape
    K, Cg, R, S = weight.shape
    if C % a.groups or K % a.groups:
        raise ValueError(f"groups={a.groups} must divide both in_channels ({C}) and "
                         f"out_channels ({K})")
    if Cg * a.groups != C:
        raise ValueError(f"weight of shape {tuple(weight.shape)} with groups={a.groups} expects "
                         f"{Cg * a.groups} input channels (weight.shape[1] * groups), but input "
                         f"of shape {tuple(x.shape)} has {C}")
    if bias is not None:
        _checks.float_array(bias, "bias", ndim=1)
        _checks.shape_is(bias, "bias", (K,))
    pt, pb, pl, pr = padding_amounts(a.padding, R, S, (a.sh, a.sw), (a.dh, a.dw))
    P = _checks.output_size(H, R, a.sh, pt + pb, a.dh, name="output height")
    Q = _checks.output_size(W, S, a.sw, pl + pr, a.dw, name="output width")
    return ConvGeometry(N, C, H, W, K, R, S, P, Q, a.sh, a.sw, pt, pb, pl, pr, a.dh, a.dw,
                        a.groups)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv2d(x, weight) + bias, PyTorch's torch.nn.functional.conv2d.

    x (N, C, H, W), weight (K, C/groups, R, S), bias (K,) or None -> y (N, K, P, Q).
    padding: int, pair, 'same' (stride 1) or 'valid'.
    """
    g = geometry(x, weight, bias, stride, padding, dilation, groups)
    return forward(x, weight, bias, g)[0]


def conv2d_backward(dy, x, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    need_input_grad=True):
    """Gradients of conv2d: (dx, dweight, dbias) given dy = dL/dy of shape (N, K, P, Q).

    need_input_grad=False skips dx (returned as None), as for a network's first layer.
    """
    g = geometry(x, weight, None, stride, padding, dilation, groups)
    return backward(dy, ConvContext(x, weight, g, None), need_input_grad)


def forward(x, weight, bias, g, workspace=None):
    """(y, ctx) for checked arguments and their ConvGeometry g: y = conv(x, weight) + bias
    and what backward needs. workspace: a gpucnn Workspace (a layer's) in which the
    device builds what it keeps for backward, reused from call to call (what the
    last call kept is then overwritten); None builds it afresh."""
    ops = backend.ops_for(backend.get_array_module(x, weight, bias))
    y, source = ops.conv2d_forward(x, weight, bias, g, workspace)
    return y, ConvContext(x, weight, g, source)


def backward(dy, ctx, need_input_grad=True):
    """(dx, dweight, dbias) for the ConvContext of a forward pass; dy is checked here.
    need_input_grad=False skips dx (None)."""
    x, weight, g = ctx.x, ctx.weight, ctx.g
    _checks.float_array(dy, "grad_output", ndim=4)
    _checks.same_dtype("input", x, grad_output=dy)
    _checks.shape_is(dy, "grad_output", (g.N, g.K, g.P, g.Q))
    ops = backend.ops_for(backend.get_array_module(dy, x, weight))
    dx = ops.conv2d_backward_data(dy, weight, g) if need_input_grad else None
    return dx, ops.conv2d_backward_filter(dy, x, g, ctx.source), ops.conv2d_backward_bias(dy)


# The three backward passes alone, for checked arguments and a ConvGeometry.

def backward_data(dy, weight, g):
    """dx (N, C, H, W): dy convolved with the rotated, channel-swapped filters."""
    return backend.ops_for(backend.get_array_module(dy, weight)).conv2d_backward_data(
        dy, weight, g)


def backward_filter(dy, x, g, saved=None):
    """dweight (K, C/groups, R, S); saved: a ConvContext's source, or None."""
    return backend.ops_for(backend.get_array_module(dy, x)).conv2d_backward_filter(
        dy, x, g, saved)


def backward_bias(dy):
    """dbias (K,) = dy summed over n, p, q."""
    return backend.ops_for(backend.get_array_module(dy)).conv2d_backward_bias(dy)
