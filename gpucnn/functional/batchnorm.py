"""Batch normalisation, forward and backward (Ioffe & Szegedy 2015; PyTorch's semantics).

Shapes: x (N, C, *spatial) (N, C) or (N, C, H, W); weight, bias, running_mean,
running_var (C,). Every statistic is per channel c over the M = N * prod(spatial)
values of that channel (axes 0 and 2...).

Training (batch statistics; an empty batch gives an empty output and leaves the
running statistics as they are, as in PyTorch):
    mu_c    = (1/M) sum x                       var_c = (1/M) sum (x - mu_c)^2   (biased)
    x_hat   = (x - mu_c) / sqrt(var_c + eps)    y     = weight_c * x_hat + bias_c
    running_mean <- (1 - momentum) running_mean + momentum mu_c
    running_var  <- (1 - momentum) running_var  + momentum var_c * M / (M - 1)  (unbiased)
Eval (running statistics):
    x_hat   = (x - running_mean_c) / sqrt(running_var_c + eps)

Backward, with g = dy and mean_c(.) the per-channel mean over the M values:
    dbias_c   = sum g                           dweight_c = sum g * x_hat
    training: dx = weight_c / sqrt(var_c + eps) * (g - mean_c(g) - x_hat * mean_c(g * x_hat))
    eval:     dx = weight_c / sqrt(running_var_c + eps) * g
The reductions are NumPy/CuPy reductions over fixed axes: the same order on every
call, so the result is deterministic on a device.

Across R ranks (sync-BN, ``sync=`` a communicator offering allreduce_sum_: the
layers of gpucnn.distributed), training uses the statistics of the global batch,
M = sum over the ranks of each rank's M_r, in the same two passes:
    S_c = allreduce(sum x, M_r)         mu_c = S_c / M
    Q_c = allreduce(sum (x - mu_c)^2)   var_c = Q_c / M
(the second pass centred on the global mean, never E[x^2] - E[x]^2), and backward
    G1_c = allreduce(sum g)   G2_c = allreduce(sum g * x_hat)
    dx = weight_c / sqrt(var_c + eps) * (g - G1_c / M - x_hat * G2_c / M)
while dweight and dbias stay this rank's own sums (the data-parallel gradient
average adds them up). Each rank's g is the gradient of its own batch's mean loss,
R times its share of the global loss's gradient; the gradient average's 1/R
undoes that (docs/distributed.md). The running statistics use the global mu and
var * M / (M - 1), the same on every rank.

What is computed and kept is d = x - mu (the centred input) and inv_std =
1/sqrt(var + eps), not x_hat = d * inv_std: each x_hat above is d * inv_std with
inv_std folded into a per-channel factor (y = d * (weight * inv_std) + bias,
dweight = inv_std * sum g*d, the x_hat term of dx = d * (inv_std * dweight / M)),
which saves a pass over the activation each way; the products g*d and d*d are
formed in a work buffer, not a fresh array.
"""
import math
from collections import namedtuple

from .. import backend
from . import _checks

# What backward needs from forward: the centred input d = x - mean (x's shape),
# 1/sqrt(var + eps) per channel (shape (C,)), and whether batch statistics were used.
# With sync-BN also the communicator (sync) and the global count M as a (1,) array.
BatchNormSaved = namedtuple("BatchNormSaved", "centred inv_std training sync count",
                            defaults=(None, None))


def _spatial(a):
    """(N, C, *spatial) -> (N, C, L): a view where a's layout allows, else a copy."""
    return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


def _channel_sum(a):
    """Per-channel sum over the batch and spatial axes: the contiguous spatial run of
    each (n, c) first, then over n (much faster than one reduction over axes
    (0, 2, ...) on the CPU; a fixed order on both devices)."""
    return _spatial(a).sum(axis=2).sum(axis=0)


def _channel_dot(ops, a, b):
    """Per-channel sum of a * b, in _channel_sum's order and NumPy's pairwise sums
    (einsum's plain float32 running sum loses accuracy on large maps). Where the
    device says so (ops.cache_chunk_bytes: the CPU) the products are formed a few
    samples at a time in a small work buffer, so that they are summed while still
    in cache rather than written out whole and read back; each (n, c) run is
    summed whole, so the chunking changes no bit. A GPU forms them in one go."""
    a, b = _spatial(a), _spatial(b)
    N = a.shape[0]
    chunk = ops.cache_chunk_bytes
    step = max(1, N if chunk is None else chunk // max(1, a[:1].nbytes))
    work = ops.scratch("batch_norm", (min(step, N),) + a.shape[1:], a.dtype)
    sums = ops.xp.empty(a.shape[:2], a.dtype)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        sums[n0:n1] = ops.xp.multiply(a[n0:n1], b[n0:n1], out=work[:n1 - n0]).sum(axis=2)
    return sums.sum(axis=0)


def _per_channel(v, x):
    """(C,) -> (1, C, 1, ...) for broadcasting against x."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def _channelwise(ops, op, a, v, out):
    """op(a, v[c], out=out) for each channel c of a and out (N, C, *spatial): over
    rows of a sample against v's values each repeated L times where
    ops.sample_rows allows (the same products and sums), else broadcast."""
    rows = ops.sample_rows(a, out)
    if rows is None:
        op(a, _per_channel(v, a), out=out)
    else:
        op(rows[0], ops.xp.repeat(v, math.prod(a.shape[2:]))[None], out=rows[1])


def _checks_all(x, running_mean, running_var, weight, bias, training):
    _checks.float_array(x, "input")
    if x.ndim < 2:
        raise ValueError(f"input must be (N, C) or (N, C, ...), got shape {tuple(x.shape)}")
    C = x.shape[1]
    arrays = dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    for name, a in arrays.items():
        if a is not None:
            _checks.float_array(a, name, ndim=1)
            if a.shape[0] != C:
                raise ValueError(f"{name} has shape {tuple(a.shape)} but input {tuple(x.shape)} "
                                 f"has {C} channels; it needs ({C},)")
    _checks.same_dtype("input", x, **arrays)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm with training=False needs running_mean and running_var")
    if training:
        M = x.size // C if C else 0
        if M == 1:  # an empty batch passes through unchanged, as in PyTorch
            raise ValueError(f"batch_norm in training needs more than 1 value per channel, got "
                             f"input of shape {tuple(x.shape)}")
    return backend.get_array_module(x, running_mean, running_var, weight, bias)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, workspace=None, sync=None):
    """(y, saved): y has x's shape; saved (BatchNormSaved) goes to batch_norm_backward.

    As torch.nn.functional.batch_norm: in training the running statistics (when
    given) are updated in place with `momentum` (a number; the layer turns
    momentum=None into the cumulative-average factor 1/num_batches_tracked).
    workspace: a layer's Workspace (gpucnn.backends.cpu.workspace) in which the
    centred input (saved) is built, reused from call to call (what the last call
    saved is then overwritten), or None for a fresh array.
    sync: in training, a communicator (allreduce_sum_(array) in place, the same
    calls on every rank) over whose ranks the statistics are taken (sync-BN); None
    for this batch alone.
    """
    xp = _checks_all(x, running_mean, running_var, weight, bias, training)
    if training and sync is not None:  # every rank joins the sums, even with no sample
        return _batch_norm_sync(backend.ops_for(xp), x, running_mean, running_var, weight, bias,
                                momentum, eps, workspace, sync)
    if training and x.size == 0:  # PyTorch: an empty output, the statistics unchanged
        C = x.shape[1]
        saved = BatchNormSaved(x * 1, xp.ones(C, x.dtype), True)
        return x * 1, saved
    C = x.shape[1]
    ops = backend.ops_for(xp)
    # in x's memory order, as x - mean was: the per-channel sums then go the same way
    centred = (ops.kept(workspace, "centred", x.shape, x.dtype)
               if x.flags.c_contiguous else xp.empty_like(x))
    y, inv_std = xp.empty_like(x), xp.empty(C, x.dtype)

    def channels(c0, c1):
        cut = slice(c0, c1)
        _forward_channels(ops, x[:, cut], *(None if a is None else a[cut] for a in
                                             (running_mean, running_var, weight, bias)),
                          training, momentum, eps, y[:, cut], centred[:, cut], inv_std[cut])
    ops.ranges(channels, C, at_least=MIN_CHANNELS_A_THREAD)
    return y, BatchNormSaved(centred, inv_std, bool(training))


# Channel ranges of at least 2 channels a thread: NumPy sums an (N, 1) column over N
# pairwise but the columns of an (N, C) block row by row, so a one-channel range
# would round its channel's sums differently from the whole (and the results would
# then depend on the thread count).
MIN_CHANNELS_A_THREAD = 2


def _update_running(running_mean, running_var, mean, var, momentum, n):
    """The running statistics' update in place, from the batch's mean and biased var
    over n values (the unbiased var, var * n / (n - 1), goes into running_var)."""
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += momentum * mean
    if running_var is not None:
        running_var *= 1 - momentum
        running_var += (momentum * n / (n - 1)) * var


def _forward_channels(ops, x, running_mean, running_var, weight, bias, training, momentum, eps,
                      y, centred, inv_std):
    """batch_norm for a range of channels, into y, centred and inv_std (views)."""
    xp = ops.xp
    if training:
        M = x.size // x.shape[1]
        mean = _channel_sum(x) / x.dtype.type(M)
        _channelwise(ops, xp.subtract, x, mean, centred)
        var = _channel_dot(ops, centred, centred) / x.dtype.type(M)
        _update_running(running_mean, running_var, mean, var, momentum, M)
    else:
        mean, var = running_mean, running_var
        _channelwise(ops, xp.subtract, x, mean, centred)
    xp.divide(1, xp.sqrt(var + x.dtype.type(eps)), out=inv_std)
    # y = x_hat * weight + bias, x_hat = centred * inv_std
    _channelwise(ops, xp.multiply, centred, inv_std if weight is None else inv_std * weight, y)
    if bias is not None:
        _channelwise(ops, xp.add, y, bias, y)


def batch_norm_backward(dy, saved, weight=None):
    """(dx, dweight, dbias) for dy of x's shape; dweight/dbias are None without weight."""
    centred, inv_std, training = saved[:3]
    _checks.float_array(dy, "grad_output")
    _checks.same_dtype("input", centred, grad_output=dy)
    _checks.shape_is(dy, "grad_output", centred.shape)
    xp = backend.get_array_module(dy, centred, weight)
    ops = backend.ops_for(xp)
    if saved.sync is not None:
        return _batch_norm_backward_sync(ops, dy, saved, weight)
    C = dy.shape[1]
    dx, dweight, dbias = xp.empty_like(centred), xp.empty(C, dy.dtype), xp.empty(C, dy.dtype)

    def channels(c0, c1):
        cut = slice(c0, c1)
        _backward_channels(ops, dy[:, cut], centred[:, cut], inv_std[cut],
                           None if weight is None else weight[cut], training,
                           dx[:, cut], dweight[cut], dbias[cut])
    ops.ranges(channels, C, at_least=MIN_CHANNELS_A_THREAD)
    if weight is None:
        return dx, None, None
    return dx, dweight, dbias


def _backward_channels(ops, dy, centred, inv_std, weight, training, dx, dweight, dbias):
    """batch_norm_backward for a range of channels, into dx, dweight and dbias (views)."""
    xp = ops.xp
    dbias[...] = _channel_sum(dy)
    dweight[...] = _channel_dot(ops, dy, centred) * inv_std  # sum dy * x_hat
    scale = inv_std if weight is None else inv_std * weight
    if training:
        M = dy.dtype.type(max(dy.size // max(dy.shape[1], 1), 1))
        # x_hat * mean(dy * x_hat) = centred * (inv_std * dweight / M)
        _channelwise(ops, xp.multiply, centred, -(inv_std * dweight) / M, dx)
        dx += dy
        _channelwise(ops, xp.subtract, dx, dbias / M, dx)
        _channelwise(ops, xp.multiply, dx, scale, dx)
    else:
        _channelwise(ops, xp.multiply, dy, scale, dx)


def _batch_norm_sync(ops, x, running_mean, running_var, weight, bias, momentum, eps, workspace,
                     sync):
    """batch_norm in training over the global batch of sync's ranks: two all-reduces
    (the per-channel sums with the count, then the sums of squares about the global
    mean). Over whole channels, not channel ranges: each collective runs once."""
    xp, C = ops.xp, x.shape[1]
    centred = (ops.kept(workspace, "centred", x.shape, x.dtype)
               if x.flags.c_contiguous else xp.empty_like(x))
    y, inv_std = xp.empty_like(x), xp.empty(C, x.dtype)
    stats = xp.empty(C + 1, x.dtype)
    stats[:C] = _channel_sum(x)
    stats[C] = x.size // C if C else 0  # this rank's M_r; exact in float32 up to 2**24
    sync.allreduce_sum_(stats)
    count = stats[C:]
    mean = stats[:C] / count
    _channelwise(ops, xp.subtract, x, mean, centred)
    squares = _channel_dot(ops, centred, centred) if x.size else xp.zeros(C, x.dtype)
    sync.allreduce_sum_(squares)
    var = squares / count
    _update_running(running_mean, running_var, mean, var, momentum, count)
    xp.divide(1, xp.sqrt(var + x.dtype.type(eps)), out=inv_std)
    _channelwise(ops, xp.multiply, centred, inv_std if weight is None else inv_std * weight, y)
    if bias is not None:
        _channelwise(ops, xp.add, y, bias, y)
    return y, BatchNormSaved(centred, inv_std, True, sync, count)


def _batch_norm_backward_sync(ops, dy, saved, weight):
    """batch_norm_backward of a sync-BN forward: one all-reduce of the per-channel
    sums of g and g * x_hat; dweight and dbias are this rank's own sums."""
    xp, C = ops.xp, dy.shape[1]
    centred, inv_std, count = saved.centred, saved.inv_std, saved.count
    sums = xp.empty(2 * C, dy.dtype)
    sums[:C] = _channel_sum(dy)
    sums[C:] = (_channel_dot(ops, dy, centred) if dy.size else 0) * inv_std
    dbias, dweight = sums[:C].copy(), sums[C:].copy()
    saved.sync.allreduce_sum_(sums)
    scale = inv_std if weight is None else inv_std * weight
    dx = xp.empty_like(centred)
    # x_hat * G2 / M = centred * (inv_std * G2 / M)
    _channelwise(ops, xp.multiply, centred, -(inv_std * sums[C:]) / count, dx)
    dx += dy
    _channelwise(ops, xp.subtract, dx, sums[:C] / count, dx)
    _channelwise(ops, xp.multiply, dx, scale, dx)
    if weight is None:
        return dx, None, None
    return dx, dweight, dbias
