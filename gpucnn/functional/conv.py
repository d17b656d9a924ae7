"""2-D convolution (cross-correlation, as PyTorch computes it), forward and backward.

Shapes: x (N, C, H, W), weight (K, C/g, R, S), bias (K,), y (N, K, P, Q).

    y[n,k,p,q]    = b[k] + sum_{c',r,s} xp[n, G(k)*C/g + c', p*sh + r*dh, q*sw + s*dw] * w[k,c',r,s]
    db[k]         = sum_{n,p,q} dy[n,k,p,q]
    dw[k,c',r,s]  = sum_{n,p,q} dy[n,k,p,q] * xp[n, G(k)*C/g + c', p*sh + r*dh, q*sw + s*dw]
    dx            = dy convolved with the 180-degree-rotated, channel-swapped filters
                    (a transposed convolution: dy spread out by the stride)

On the CPU the sums are matrix products over an im2col matrix, per group:
    cols[(n,p,q), (r,s,c')] = xp[n, g*C/g + c', p*sh + r*dh, q*sw + s*dw]
(columns in (r,s,c') order from a channels-last copy of x, or in (c',r,s) order
from x itself, whichever copies longer contiguous runs) and the weight matrix
wm[k, (r,s,c')] = w[k,c',r,s], its columns in the same order. Then
y = wm @ cols^T and dw = dy @ cols, with cols built and consumed a few samples
at a time so that it stays in cache.
dx, for stride 1 and 16+ channels a group, is the forward pass applied to dy with
the rotated, channel-swapped filters (the full correlation); otherwise it is
computed one kernel offset (r,s) at a time: dy @ w[:, :, r, s] is added back at
the input positions that tap read (a col2im that never builds the whole column
matrix). On the GPU the three
passes are implicit-GEMM kernels (kernels/conv2d.cu) that gather the same
matrices tile by tile into shared memory and never build them; the bias
gradient is a fixed-order reduction (kernels/conv2d_reduce.cu).
"""
import numbers
from collections import namedtuple

from .. import backend
from ..backends.cpu import threads as cpu_threads, workspace as _workspace
from ..backends.cuda import kernels as cuda
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
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    groups = int(groups)
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


def im2col_source(xp, x, g, workspace=None):
    """What the CPU's im2col reads: x zero-padded, channels-last (N, Hp, Wp, C) where
    _channels_last(g) (each (s, c) run of a window row is then contiguous, which
    makes the copy fast), else NCHW (N, C, Hp, Wp). The forward pass can hand it to
    backward_filter, which then does not build it again. The channels-last copy is
    built in the workspace's "source" slot where one is given."""
    if not _channels_last(g):
        return xp.pad(x, ((0, 0), (0, 0), (g.pt, g.pb), (g.pl, g.pr)))
    Hp, Wp = g.H + g.pt + g.pb, g.W + g.pl + g.pr
    xpad = _workspace.empty(xp, workspace, "source", (g.N, Hp, Wp, g.C), x.dtype)
    # only the border is zeroed: the inside is overwritten
    xpad[:, :g.pt], xpad[:, g.pt + g.H:] = 0, 0
    xpad[:, :, :g.pl], xpad[:, :, g.pl + g.W:] = 0, 0

    def copy(n0, n1):
        xpad[n0:n1, g.pt:g.pt + g.H, g.pl:g.pl + g.W, :] = x[n0:n1].transpose(0, 2, 3, 1)
    cpu_threads.map_ranges(copy, g.N)
    return xpad


# An im2col chunk on the CPU stays about cache-sized: 2 MB (a resnet step on two
# threads took 260-310 ms with it against 300-390 with 4 MB; on one, the same).
CHUNK_BYTES = 2 << 20


def _channels_last(g):
    """Whether the im2col copy moves longer contiguous runs with the columns in
    (r,s,c') order from a channels-last input (a run is a window row, S*C/g
    values) than in (c',r,s) order from the NCHW input (a run is Q pixels)."""
    run_nhwc = (g.S if g.dw == 1 else 1) * (g.C // g.groups)
    run_nchw = g.Q if g.sw == 1 else 1
    return run_nhwc >= run_nchw


CHUNK_ROUND = 4  # chunk counts are a multiple of this (where N allows)


def _chunks(N, per_sample):
    """The batch chunks [(n0, n1)] a pass works on: about CHUNK_BYTES of per_sample
    bytes each (at least one sample), so that the copy and the matrix product that
    reads it stay in cache. The threads share them out in blocks (cpu_threads), so
    the chunks are as even as can be and their count a multiple of CHUNK_ROUND:
    1, 2 or 4 threads get equal work (with 15 chunks of 9 samples and one of 2, one
    thread of two had 72 samples to the other's 56). The chunks do not depend on
    the thread count, so neither does what is summed over them."""
    B = max(1, min(N, CHUNK_BYTES // max(1, per_sample)))
    count = -(-N // B)  # ceil
    count = min(N, -(-count // CHUNK_ROUND) * CHUNK_ROUND)
    return [(N * i // count, N * (i + 1) // count) for i in range(count)]


def _column_chunks(g, itemsize):
    """_chunks for im2col's columns: P*Q rows of R*S*C values a sample."""
    return _chunks(g.N, g.P * g.Q * (g.C * g.R * g.S) * itemsize)


def _im2col_chunks(xp, xpad, g, chunks):
    """Yield (n0, n1, cols) for the batch chunks [n0, n1) of xpad = im2col_source(xp, x, g):
    cols (groups, (n1-n0)*P*Q, R*S*C/g)
    has row (n,p,q) and, for column (c',r,s), xp[n, group*C/g + c', p*sh + r*dh, q*sw + s*dw];
    the columns are in (r,s,c') order where _channels_last(g), else in (c',r,s) order
    (then cols is the transpose of a row-major (c',r,s) x (n,p,q) matrix).

    The chunks (_chunks) go through one buffer, reused.
    """
    if not chunks:  # an empty batch
        return
    G, Cg, J = g.groups, g.C // g.groups, g.C // g.groups * g.R * g.S
    B = max(n1 - n0 for n0, n1 in chunks)
    if _channels_last(g):
        sN, sH, sW, sC = xpad.strides
        window = (G, B, g.P, g.Q, g.R, g.S, Cg)
        strides = (Cg * sC, sN, g.sh * sH, g.sw * sW, g.dh * sH, g.dw * sW, sC)
        batch_axis = 1
    else:
        sN, sC, sH, sW = xpad.strides
        window = (G, Cg, g.R, g.S, B, g.P, g.Q)
        strides = (Cg * sC, sC, g.dh * sH, g.dw * sW, sN, g.sh * sH, g.sw * sW)
        batch_axis = 4
    buf = cpu_threads.scratch(xp, "im2col", window, xpad.dtype)
    for n0, n1 in chunks:
        b = n1 - n0
        shape = window[:batch_axis] + (b,) + window[batch_axis + 1:]
        view = xp.lib.stride_tricks.as_strided(xpad[n0:], shape=shape, strides=strides)
        part = buf[(slice(None),) * batch_axis + (slice(0, b),)]
        xp.copyto(part, view)
        if batch_axis == 1:
            yield n0, n0 + b, part.reshape(G, b * g.P * g.Q, J)
        else:
            yield n0, n0 + b, part.reshape(G, J, b * g.P * g.Q).transpose(0, 2, 1)


def _weight_matrix(xp, weight, g):
    """weight (K, C/g, R, S) -> wm (groups, K/g, R*S*C/g), its columns in the cols' order."""
    G = g.groups
    w = weight.reshape(G, g.K // G, g.C // G, g.R, g.S)
    if _channels_last(g):
        w = w.transpose(0, 1, 3, 4, 2)
    return xp.ascontiguousarray(w).reshape(G, g.K // G, g.R * g.S * (g.C // G))


def _grouped_dy(xp, dy, g):
    """dy (N, K, P, Q) -> (groups, N*P*Q, K/g), the layout of the cols' rows."""
    G = g.groups
    dy = dy.reshape(g.N, G, g.K // G, g.P, g.Q).transpose(1, 0, 3, 4, 2)
    out = cpu_threads.copyto(xp, xp.empty(dy.shape, dy.dtype), dy, axis=1)
    return out.reshape(G, g.N * g.P * g.Q, g.K // G)


def _channel_major_dy(xp, dy, g):
    """dy (N, K, P, Q) -> (groups, K/g, N*P*Q): a cheap copy, whole (p,q) planes at a time."""
    G = g.groups
    dy = dy.reshape(g.N, G, g.K // G, g.P * g.Q).transpose(1, 2, 0, 3)
    out = cpu_threads.copyto(xp, xp.empty(dy.shape, dy.dtype), dy, axis=2)
    return out.reshape(G, g.K // G, g.N * g.P * g.Q)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv2d(x, weight) + bias, PyTorch's torch.nn.functional.conv2d.

    x (N, C, H, W), weight (K, C/groups, R, S), bias (K,) or None -> y (N, K, P, Q).
    padding: int, pair, 'same' (stride 1) or 'valid'.
    """
    g = geometry(x, weight, bias, stride, padding, dilation, groups)
    return forward(x, weight, bias, g)


def conv2d_backward(dy, x, weight, stride=1, padding=0, dilation=1, groups=1, *,
                    need_input_grad=True):
    """Gradients of conv2d: (dx, dweight, dbias) given dy = dL/dy of shape (N, K, P, Q).

    need_input_grad=False skips dx (returned as None), as for a network's first layer.
    """
    g = geometry(x, weight, None, stride, padding, dilation, groups)
    return backward(dy, x, weight, g, need_input_grad)


def forward(x, weight, bias, g, *, save=False, workspace=None):
    """y for checked arguments: wm @ cols^T, chunk by chunk (on a GPU: the
    implicit-GEMM kernel, bias added in its epilogue).

    save=True returns (y, saved) instead, saved being what backward_filter reads
    (on the CPU the padded input im2col_source built; None on a GPU): a layer keeps
    it for its backward pass, which then does not pad and transpose x again, and
    can pass a gpucnn.workspace.Workspace in which it is built, reused from call to
    call (what the last call saved is then overwritten).
    """
    xp = backend.get_array_module(x, weight, bias)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        y = kernels.conv2d_forward(x, weight, bias, g)
        return (y, None) if save else y
    with cpu_threads.section(xp):  # the BLAS held once for the pass's parts
        source = im2col_source(xp, x, g, workspace if save else None)
        y = _forward_matmul(xp, source, weight, bias, g)
    return (y, source) if save else y


def _per_sample(g):
    """Whether a pass's matrix products go a sample at a time, each sample's rows of
    y or dy read or written where they lie in the NCHW array, rather than one
    product a chunk, whose (K/g, chunk*P*Q) layout costs a transposing copy of y or
    dy. Where a sample's P*Q is shorter than a column (R*S*C/g) the small products
    cost more than the copy (one thread: 16 channels at 28x28, backward-filter 13.1
    -> 11.8 ms, forward 13.7 -> 13.1; 64 channels at 7x7, 9.0 -> 13.2 and 6.9 -> 7.7)."""
    return g.R * g.S * (g.C // g.groups) <= g.P * g.Q


def _forward_matmul(xp, source, weight, bias, g):
    wm, PQ, G, Kg = _weight_matrix(xp, weight, g), g.P * g.Q, g.groups, g.K // g.groups
    out, per_sample = xp.empty((g.N, g.K, PQ), dtype=source.dtype), _per_sample(g)

    def run(chunks):
        part = None
        for n0, n1, cols in _im2col_chunks(xp, source, g, chunks):
            b, y = n1 - n0, out[n0:n1]
            if per_sample:
                xp.matmul(wm[:, None], cols.reshape(G, b, PQ, -1).transpose(0, 1, 3, 2),
                          out=y.reshape(b, G, Kg, PQ).transpose(1, 0, 2, 3))
            else:
                if part is None:  # room for the block's longest chunk
                    longest = max(c1 - c0 for c0, c1 in chunks)
                    part = cpu_threads.scratch(xp, "product", (G, Kg, longest * PQ), source.dtype)
                product = part[:, :, :cols.shape[1]]
                xp.matmul(wm, cols.transpose(0, 2, 1), out=product)  # (G, K/g, b*P*Q)
                y[...] = product.reshape(g.K, b, PQ).transpose(1, 0, 2)
            if bias is not None:
                y += bias.reshape(1, g.K, 1)
    cpu_threads.map_blocks(run, _column_chunks(g, source.itemsize))
    return out.reshape(g.N, g.K, g.P, g.Q)


def backward(dy, x, weight, g, need_input_grad=True, *, saved=None):
    """(dx, dweight, dbias) for a checked x and weight; dy is checked here.
    saved: what forward(..., save=True) returned with y, or None."""
    _checks.float_array(dy, "grad_output", ndim=4)
    _checks.same_dtype("input", x, grad_output=dy)
    _checks.shape_is(dy, "grad_output", (g.N, g.K, g.P, g.Q))
    backend.get_array_module(dy, x, weight)
    dx = backward_data(dy, weight, g) if need_input_grad else None
    return dx, backward_filter(dy, x, g, saved), backward_bias(dy)


# The three passes below take checked arguments and a ConvGeometry; each picks
# the device's implementation: matrix products here, CUDA kernels on a GPU.

def backward_data(dy, weight, g):
    """dx (N, C, H, W): the flipped-filter convolution. With stride 1 (and enough
    channels) that is the forward pass over dy (see _full_correlation): one matrix
    product per chunk, reducing over (r,s,k). Otherwise one kernel offset at a time:
    for each tap (r,s), dy @ w[:, :, r, s] (rows (n,p,q), columns c') is what the
    tap sends back to input pixel (p*sh + r*dh, q*sw + s*dw) of the padded input;
    the taps' shares are added up there and the padding is cropped off.
    """
    xp = backend.get_array_module(dy, weight)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        return kernels.conv2d_backward_data(dy, weight, g)
    with cpu_threads.section(xp):  # the BLAS held once for the pass's parts
        return _backward_data_cpu(xp, dy, weight, g)


def _backward_data_cpu(xp, dy, weight, g):
    full = _full_correlation(g)
    if full is not None:
        return _forward_matmul(xp, im2col_source(xp, dy, full), _rotated_transposed(weight, g),
                               None, full)
    G, Cg, PQ = g.groups, g.C // g.groups, g.P * g.Q
    dyg = _grouped_dy(xp, dy, g)  # rows (n,p,q): each tap's share comes out channels-last
    taps = xp.ascontiguousarray(weight.reshape(G, g.K // G, Cg, g.R, g.S).transpose(3, 4, 0, 1, 2))
    dxp = xp.empty((g.N, g.H + g.pt + g.pb, g.W + g.pl + g.pr, G, Cg), dtype=dy.dtype)

    def run(chunks):
        for n0, n1 in chunks:
            dxp[n0:n1] = 0
            for r in range(g.R):  # a loop over kernel offsets, not pixels
                h0 = r * g.dh
                for s in range(g.S):
                    w0 = s * g.dw
                    share = xp.matmul(dyg[:, n0 * PQ:n1 * PQ], taps[r, s])
                    dxp[n0:n1, h0:h0 + g.sh * (g.P - 1) + 1:g.sh,
                        w0:w0 + g.sw * (g.Q - 1) + 1:g.sw] += \
                        share.reshape(G, n1 - n0, g.P, g.Q, Cg).transpose(1, 2, 3, 0, 4)
    # a few samples at a time, so that each tap's share is added while in cache
    cpu_threads.map_blocks(run, _chunks(g.N, 4 * PQ * g.C * dy.itemsize))
    dx = dxp[:, g.pt:g.pt + g.H, g.pl:g.pl + g.W].reshape(g.N, g.H, g.W, g.C)
    return cpu_threads.copyto(xp, xp.empty((g.N, g.C, g.H, g.W), dy.dtype),
                              dx.transpose(0, 3, 1, 2))


FULL_MIN_CHANNELS = 16


def _full_correlation(g):
    """For stride 1, dx is a plain convolution of dy (as the forward pass computes
    it) with the rotated filters, dy padded by the dilated filter extent minus the
    forward padding: dx[n,c,h,w] = sum_{k,r,s} dy[n,k, h + pt - r*dh, w + pl - s*dw] w[k,c,r,s].
    Its geometry, or None where that padding would be negative, the stride > 1, or
    dx has fewer than FULL_MIN_CHANNELS channels a group: its matrix product then has
    so few rows that building dy's column matrix (R*S*K/g columns) costs more than
    the tap-by-tap sums it replaces (1.4x slower at C=3, K=64; 25% faster at C=K=16)."""
    top, bottom = (g.R - 1) * g.dh - g.pt, (g.R - 1) * g.dh - g.pb
    left, right = (g.S - 1) * g.dw - g.pl, (g.S - 1) * g.dw - g.pr
    if ((g.sh, g.sw) != (1, 1) or min(top, bottom, left, right) < 0
            or g.C // g.groups < FULL_MIN_CHANNELS):
        return None
    return ConvGeometry(g.N, g.K, g.P, g.Q, g.C, g.R, g.S, g.H, g.W, 1, 1,
                        top, bottom, left, right, g.dh, g.dw, g.groups)


def _rotated_transposed(weight, g):
    """weight (K, C/g, R, S) -> (C, K/g, R, S), each group's filters with input and
    output channels swapped and the taps rotated by 180 degrees (a view for one
    group; reshape copies where groups > 1 need it)."""
    G = g.groups
    w = weight.reshape(G, g.K // G, g.C // G, g.R, g.S).transpose(0, 2, 1, 3, 4)
    return w.reshape(g.C, g.K // G, g.R, g.S)[:, :, ::-1, ::-1]


def backward_filter(dy, x, g, saved=None):
    """dweight (K, C/groups, R, S) = dy @ cols, summed over the chunks in order.
    saved: the forward pass's im2col_source(x), built here when None."""
    xp = backend.get_array_module(dy, x)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        return kernels.conv2d_backward_filter(dy, x, g)
    with cpu_threads.section(xp):  # the BLAS held once for the pass's parts
        return _backward_filter_cpu(xp, dy, x, g, saved)


def _backward_filter_cpu(xp, dy, x, g, saved):
    if saved is None:
        saved = im2col_source(xp, x, g)
    G, Kg, PQ, dweight = g.groups, g.K // g.groups, g.P * g.Q, None
    # a product a sample (see _per_sample) reads dy[n] where it lies, and leaves a
    # (K/g, R*S*C/g) product a sample for the chunk to add up
    per_sample = _per_sample(g)
    dyk = None if per_sample else _channel_major_dy(xp, dy, g)

    def products(chunks):  # (groups, K/g, R*S*C/g) from each chunk, as they come
        for n0, n1, cols in _im2col_chunks(xp, saved, g, chunks):
            b = n1 - n0
            if per_sample:  # the chunk's samples added in order
                yield xp.matmul(dy[n0:n1].reshape(b, G, Kg, PQ).transpose(1, 0, 2, 3),
                                cols.reshape(G, b, PQ, -1)).sum(axis=1)
            else:
                yield xp.matmul(dyk[:, :, n0 * PQ:n1 * PQ], cols)
    chunks, T = _column_chunks(g, saved.itemsize), cpu_threads.get_num_threads()
    if cpu_threads.splits(xp):
        # rounds of one chunk a thread: T products held at a time, not one a chunk
        parts = (part for i in range(0, len(chunks), T)
                 for block in cpu_threads.map_blocks(lambda c: list(products(c)),
                                                     chunks[i:i + T])
                 for part in block)
    else:
        parts = products(chunks)
    for part in parts:  # added in chunk order, whatever the thread count
        dweight = part if dweight is None else dweight + part
    if dweight is None:  # an empty batch: no chunks, no gradient
        return xp.zeros((g.K, g.C // g.groups, g.R, g.S), dtype=dy.dtype)
    if not _channels_last(g):
        return dweight.reshape(g.K, g.C // g.groups, g.R, g.S)
    dweight = dweight.reshape(g.K, g.R, g.S, g.C // g.groups)
    return xp.ascontiguousarray(dweight.transpose(0, 3, 1, 2))


def backward_bias(dy):
    """dbias (K,) = dy summed over n, p, q."""
    xp = backend.get_array_module(dy)
    kernels = cuda.kernels_for(xp)
    if kernels is not None:
        return kernels.conv2d_backward_bias(dy)
    return dy.sum(axis=(0, 2, 3))

