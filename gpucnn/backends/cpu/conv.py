"""The CPU's convolution passes: matrix products over an im2col matrix, per group.

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
matrix).

The batch chunks are shared out between gpucnn's CPU threads (threads.py); what
each chunk computes and the order the chunk results are added in do not depend on
the thread count. Every function takes checked NumPy arrays and a ConvGeometry g.
"""
import numpy

from . import threads, workspace as _workspace

# An im2col chunk stays about the size of a core's share of the cache: big enough
# for long matrix products, small enough that the copy is still cached when the
# product reads it.
CHUNK_BYTES = 2 << 20
CHUNK_ROUND = 4  # chunk counts are a multiple of this (where N allows)
# backward-data's full correlation needs this many input channels a group (see
# _full_correlation)
FULL_MIN_CHANNELS = 16


def im2col_source(x, g, workspace=None):
    """What im2col reads: x zero-padded, channels-last (N, Hp, Wp, C) where
    _channels_last(g) (each (s, c) run of a window row is then contiguous, which
    makes the copy fast), else NCHW (N, C, Hp, Wp). The forward pass hands it to
    backward_filter, which then does not build it again. The channels-last copy is
    built in the workspace's "source" slot where one is given."""
    if not _channels_last(g):
        return numpy.pad(x, ((0, 0), (0, 0), (g.pt, g.pb), (g.pl, g.pr)))
    Hp, Wp = g.H + g.pt + g.pb, g.W + g.pl + g.pr
    xpad = _workspace.empty(numpy, workspace, "source", (g.N, Hp, Wp, g.C), x.dtype)
    # only the border is zeroed: the inside is overwritten
    xpad[:, :g.pt], xpad[:, g.pt + g.H:] = 0, 0
    xpad[:, :, :g.pl], xpad[:, :, g.pl + g.W:] = 0, 0

    def copy(n0, n1):
        xpad[n0:n1, g.pt:g.pt + g.H, g.pl:g.pl + g.W, :] = x[n0:n1].transpose(0, 2, 3, 1)
    threads.map_ranges(copy, g.N)
    return xpad


def _channels_last(g):
    """Whether the im2col copy moves longer contiguous runs with the columns in
    (r,s,c') order from a channels-last input (a run is a window row, S*C/g
    values) than in (c',r,s) order from the NCHW input (a run is Q pixels)."""
    run_nhwc = (g.S if g.dw == 1 else 1) * (g.C // g.groups)
    run_nchw = g.Q if g.sw == 1 else 1
    return run_nhwc >= run_nchw


def _chunks(N, per_sample):
    """The batch chunks [(n0, n1)] a pass works on: about CHUNK_BYTES of per_sample
    bytes each (at least one sample), so that the copy and the matrix product that
    reads it stay in cache. The threads share them out in blocks (threads.py), so
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


def _im2col_chunks(xpad, g, chunks):
    """Yield (n0, n1, cols) for the batch chunks [n0, n1) of xpad = im2col_source(x, g):
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
    buf = threads.scratch(numpy, "im2col", window, xpad.dtype)
    for n0, n1 in chunks:
        b = n1 - n0
        shape = window[:batch_axis] + (b,) + window[batch_axis + 1:]
        view = numpy.lib.stride_tricks.as_strided(xpad[n0:], shape=shape, strides=strides)
        part = buf[(slice(None),) * batch_axis + (slice(0, b),)]
        numpy.copyto(part, view)
        if batch_axis == 1:
            yield n0, n0 + b, part.reshape(G, b * g.P * g.Q, J)
        else:
            yield n0, n0 + b, part.reshape(G, J, b * g.P * g.Q).transpose(0, 2, 1)


def _weight_matrix(weight, g):
    """weight (K, C/g, R, S) -> wm (groups, K/g, R*S*C/g), its columns in the cols' order."""
    G = g.groups
    w = weight.reshape(G, g.K // G, g.C // G, g.R, g.S)
    if _channels_last(g):
        w = w.transpose(0, 1, 3, 4, 2)
    return numpy.ascontiguousarray(w).reshape(G, g.K // G, g.R * g.S * (g.C // G))


def _grouped_dy(dy, g):
    """dy (N, K, P, Q) -> (groups, N*P*Q, K/g), the layout of the cols' rows."""
    G = g.groups
    dy = dy.reshape(g.N, G, g.K // G, g.P, g.Q).transpose(1, 0, 3, 4, 2)
    out = threads.copyto(numpy, numpy.empty(dy.shape, dy.dtype), dy, axis=1)
    return out.reshape(G, g.N * g.P * g.Q, g.K // G)


def _channel_major_dy(dy, g):
    """dy (N, K, P, Q) -> (groups, K/g, N*P*Q): a cheap copy, whole (p,q) planes at a time."""
    G = g.groups
    dy = dy.reshape(g.N, G, g.K // G, g.P * g.Q).transpose(1, 2, 0, 3)
    out = threads.copyto(numpy, numpy.empty(dy.shape, dy.dtype), dy, axis=2)
    return out.reshape(G, g.K // G, g.N * g.P * g.Q)


def _per_sample(g):
    """Whether a pass's matrix products go a sample at a time, each sample's rows of
    y or dy read or written where they lie in the NCHW array, rather than one
    product a chunk, whose (K/g, chunk*P*Q) layout costs a transposing copy of y or
    dy. Where a sample's P*Q is shorter than a column (R*S*C/g) the many small
    products cost more than that copy, so they are used only where P*Q is the
    longer of the two."""
    return g.R * g.S * (g.C // g.groups) <= g.P * g.Q


def forward(x, weight, bias, g, workspace=None):
    """(y, source): y = wm @ cols^T + bias, chunk by chunk, and the padded input
    (im2col_source) it read, for backward_filter. workspace: where the channels-last
    copy is built and kept from call to call (a layer's), or None for a fresh one."""
    with threads.section(numpy):  # the BLAS held once for the pass's parts
        source = im2col_source(x, g, workspace)
        y = _forward_matmul(source, weight, bias, g)
    return y, source


def _forward_matmul(source, weight, bias, g):
    wm, PQ, G, Kg = _weight_matrix(weight, g), g.P * g.Q, g.groups, g.K // g.groups
    out, per_sample = numpy.empty((g.N, g.K, PQ), dtype=source.dtype), _per_sample(g)

    def run(chunks):
        part = None
        for n0, n1, cols in _im2col_chunks(source, g, chunks):
            b, y = n1 - n0, out[n0:n1]
            if per_sample:
                numpy.matmul(wm[:, None], cols.reshape(G, b, PQ, -1).transpose(0, 1, 3, 2),
                             out=y.reshape(b, G, Kg, PQ).transpose(1, 0, 2, 3))
            else:
                if part is None:  # room for the block's longest chunk
                    longest = max(c1 - c0 for c0, c1 in chunks)
                    part = threads.scratch(numpy, "product", (G, Kg, longest * PQ),
                                           source.dtype)
                product = part[:, :, :cols.shape[1]]
                numpy.matmul(wm, cols.transpose(0, 2, 1), out=product)  # (G, K/g, b*P*Q)
                y[...] = product.reshape(g.K, b, PQ).transpose(1, 0, 2)
            if bias is not None:
                y += bias.reshape(1, g.K, 1)
    threads.map_blocks(run, _column_chunks(g, source.itemsize))
    return out.reshape(g.N, g.K, g.P, g.Q)


def backward_data(dy, weight, g):
    """dx (N, C, H, W): the flipped-filter convolution. With stride 1 (and enough
    channels) that is the forward pass over dy (see _full_correlation): one matrix
    product per chunk, reducing over (r,s,k). Otherwise one kernel offset at a time:
    for each tap (r,s), dy @ w[:, :, r, s] (rows (n,p,q), columns c') is what the
    tap sends back to input pixel (p*sh + r*dh, q*sw + s*dw) of the padded input;
    the taps' shares are added up there and the padding is cropped off.
    """
    with threads.section(numpy):  # the BLAS held once for the pass's parts
        full = _full_correlation(g)
        if full is not None:
            return _forward_matmul(im2col_source(dy, full), _rotated_transposed(weight, g),
                                   None, full)
        return _backward_data_by_taps(dy, weight, g)


def _backward_data_by_taps(dy, weight, g):
    G, Cg, PQ = g.groups, g.C // g.groups, g.P * g.Q
    dyg = _grouped_dy(dy, g)  # rows (n,p,q): each tap's share comes out channels-last
    taps = numpy.ascontiguousarray(
        weight.reshape(G, g.K // G, Cg, g.R, g.S).transpose(3, 4, 0, 1, 2))
    dxp = numpy.empty((g.N, g.H + g.pt + g.pb, g.W + g.pl + g.pr, G, Cg), dtype=dy.dtype)

    def run(chunks):
        for n0, n1 in chunks:
            dxp[n0:n1] = 0
            for r in range(g.R):  # a loop over kernel offsets, not pixels
                h0 = r * g.dh
                for s in range(g.S):
                    w0 = s * g.dw
                    share = numpy.matmul(dyg[:, n0 * PQ:n1 * PQ], taps[r, s])
                    dxp[n0:n1, h0:h0 + g.sh * (g.P - 1) + 1:g.sh,
                        w0:w0 + g.sw * (g.Q - 1) + 1:g.sw] += \
                        share.reshape(G, n1 - n0, g.P, g.Q, Cg).transpose(1, 2, 3, 0, 4)
    # a few samples at a time, so that each tap's share is added while in cache
    threads.map_blocks(run, _chunks(g.N, 4 * PQ * g.C * dy.itemsize))
    dx = dxp[:, g.pt:g.pt + g.H, g.pl:g.pl + g.W].reshape(g.N, g.H, g.W, g.C)
    return threads.copyto(numpy, numpy.empty((g.N, g.C, g.H, g.W), dy.dtype),
                          dx.transpose(0, 3, 1, 2))


def _full_correlation(g):
    """For stride 1, dx is a plain convolution of dy (as the forward pass computes
    it) with the rotated filters, dy padded by the dilated filter extent minus the
    forward padding: dx[n,c,h,w] = sum_{k,r,s} dy[n,k, h + pt - r*dh, w + pl - s*dw] w[k,c,r,s].
    Its geometry, or None where that padding would be negative, the stride > 1, or
    dx has fewer than FULL_MIN_CHANNELS channels a group: its matrix product then has
    so few rows that building dy's column matrix (R*S*K/g columns) costs more than
    the tap-by-tap sums it replaces."""
    top, bottom = (g.R - 1) * g.dh - g.pt, (g.R - 1) * g.dh - g.pb
    left, right = (g.S - 1) * g.dw - g.pl, (g.S - 1) * g.dw - g.pr
    if ((g.sh, g.sw) != (1, 1) or min(top, bottom, left, right) < 0
            or g.C // g.groups < FULL_MIN_CHANNELS):
        return None
    return g._replace(C=g.K, H=g.P, W=g.Q, K=g.C, P=g.H, Q=g.W, sh=1, sw=1,
                      pt=top, pb=bottom, pl=left, pr=right)


def _rotated_transposed(weight, g):
    """weight (K, C/g, R, S) -> (C, K/g, R, S), each group's filters with input and
    output channels swapped and the taps rotated by 180 degrees (a view for one
    group; reshape copies where groups > 1 need it)."""
    G = g.groups
    w = weight.reshape(G, g.K // G, g.C // G, g.R, g.S).transpose(0, 2, 1, 3, 4)
    return w.reshape(g.C, g.K // G, g.R, g.S)[:, :, ::-1, ::-1]


def backward_filter(dy, x, g, saved=None):
    """dweight (K, C/groups, R, S) = dy @ cols, summed over the chunks in order.
    saved: the forward pass's im2col_source(x, g), built here when None."""
    with threads.section(numpy):  # the BLAS held once for the pass's parts
        if saved is None:
            saved = im2col_source(x, g)
        dweight = None
        for part in _filter_products(dy, saved, g):  # in chunk order, whatever the threads
            dweight = part if dweight is None else dweight + part
    if dweight is None:  # an empty batch: no chunks, no gradient
        return numpy.zeros((g.K, g.C // g.groups, g.R, g.S), dtype=dy.dtype)
    if not _channels_last(g):
        return dweight.reshape(g.K, g.C // g.groups, g.R, g.S)
    dweight = dweight.reshape(g.K, g.R, g.S, g.C // g.groups)
    return numpy.ascontiguousarray(dweight.transpose(0, 3, 1, 2))


def _filter_products(dy, saved, g):
    """Each chunk's (groups, K/g, R*S*C/g) product dy @ cols, in chunk order."""
    G, Kg, PQ = g.groups, g.K // g.groups, g.P * g.Q
    # a product a sample (see _per_sample) reads dy[n] where it lies, and leaves a
    # (K/g, R*S*C/g) product a sample for the chunk to add up
    per_sample = _per_sample(g)
    dyk = None if per_sample else _channel_major_dy(dy, g)

    def products(chunks):  # (groups, K/g, R*S*C/g) from each chunk, as they come
        for n0, n1, cols in _im2col_chunks(saved, g, chunks):
            b = n1 - n0
            if per_sample:  # the chunk's samples added in order
                yield numpy.matmul(dy[n0:n1].reshape(b, G, Kg, PQ).transpose(1, 0, 2, 3),
                                   cols.reshape(G, b, PQ, -1)).sum(axis=1)
            else:
                yield numpy.matmul(dyk[:, :, n0 * PQ:n1 * PQ], cols)
    chunks, T = _column_chunks(g, saved.itemsize), threads.get_num_threads()
    if not threads.splits(numpy):
        return products(chunks)
    # rounds of one chunk a thread: T products held at a time, not one a chunk
    return (part for i in range(0, len(chunks), T)
            for block in threads.map_blocks(lambda c: list(products(c)), chunks[i:i + T])
            for part in block)


def backward_bias(dy):
    """dbias (K,) = dy summed over n, p, q."""
    return dy.sum(axis=(0, 2, 3))
