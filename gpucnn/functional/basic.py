"""ReLU, Linear, Flatten, global average pooling, dropout and softmax cross-entropy,
forward and backward.

    relu:    y = max(x, 0);           dx = dy * [x > 0]  (0 at exactly 0)
    linear:  y = x w^T + b;           dx = dy w, dw = dy^T x, db = sum_n dy   (w is (out, in))
    loss:    L = -(1/N) sum_n sum_k q_nk log softmax(z_n)_k;  dz = (softmax(z) - q) / N
             with q = (1 - s) onehot(y) + s / K  (label smoothing s, K classes; s = 0: plain
             cross-entropy), exactly torch.nn.functional.cross_entropy(label_smoothing=s)
    global average pool: y[n, c] = mean_hw x[n, c, h, w];  dx[n, c, h, w] = dy[n, c] / (H W)
    dropout: y = x * mask, mask = [u >= p] / (1 - p) with u ~ U[0, 1) per element;  dx = dy * mask

The layers (gpucnn.nn) call the *_forward functions, which return (y, ctx), and
hand ctx to the matching backward: relu_backward(dy, x), linear_backward(dy, x, w),
flatten_backward(dy, shape), global_avg_pool2d_backward(dy, shape) and
dropout_backward(dy, mask).
"""
import math

from .. import backend, random, validate
from . import _checks


def relu(x):
    _checks.float_array(x, "input")
    xp = backend.get_array_module(x)
    ops = backend.ops_for(xp)
    out = xp.empty_like(x)
    rows = ops.sample_rows(x, out)
    if rows is not None:  # the same bits as against a scalar 0, NaN and -0.0 included
        zeros = xp.zeros((1, rows[0].shape[1]), x.dtype)
        ops.rows(xp.maximum, rows[1], rows[0], zeros)
        return out
    return ops.rows(xp.maximum, out, x, 0)


def relu_forward(x):
    """(relu(x), ctx): the ctx for relu_backward is x."""
    return relu(x), x


def relu_backward(dy, x):
    _checks.float_array(x, "input")
    _checks.float_array(dy, "grad_output")
    _checks.same_dtype("input", x, grad_output=dy)
    _checks.shape_is(dy, "grad_output", x.shape)
    xp = backend.get_array_module(dy, x)
    return backend.ops_for(xp).rows(lambda g, a, out: xp.multiply(g, a > 0, out=out),
                                    xp.empty(dy.shape, dy.dtype), dy, x)


def _linear_checks(x, weight, bias=None):
    _checks.float_array(x, "input", ndim=2)
    _checks.float_array(weight, "weight", ndim=2)
    _checks.same_dtype("input", x, weight=weight, bias=bias)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[1]} features (shape {tuple(x.shape)}) but weight "
                         f"{tuple(weight.shape)} expects in_features={weight.shape[1]}")
    if bias is not None:
        _checks.float_array(bias, "bias", ndim=1)
        _checks.shape_is(bias, "bias", (weight.shape[0],))
    return backend.get_array_module(x, weight, bias)


def linear(x, weight, bias=None):
    """x (N, in), weight (out, in), bias (out,) -> y (N, out)."""
    _linear_checks(x, weight, bias)
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y


def linear_forward(x, weight, bias=None):
    """(linear(x, weight, bias), ctx): the ctx for linear_backward is x."""
    return linear(x, weight, bias), x


def linear_backward(dy, x, weight):
    """(dx, dweight, dbias) given dy of shape (N, out)."""
    _linear_checks(x, weight)
    _checks.float_array(dy, "grad_output", ndim=2)
    _checks.same_dtype("input", x, grad_output=dy)
    _checks.shape_is(dy, "grad_output", (x.shape[0], weight.shape[0]))
    backend.get_array_module(dy, x, weight)
    return dy @ weight, dy.T @ x, dy.sum(axis=0)


def softmax_cross_entropy(logits, labels, label_smoothing=0.0, *, check_labels=True):
    """(loss, dlogits): the batch-mean cross-entropy of softmax(logits) against
    integer labels, and its gradient. logits (N, classes), labels (N,) ints.
    label_smoothing in [0, 1] mixes the one-hot target with the uniform one (PyTorch's rule).

    check_labels: raise ValueError for a label outside [0, classes). On a GPU that
    reads one value back (a synchronisation); the training step passes False and
    the labels are checked once per dataset instead (gpucnn.step.check_labels).
    """
    _checks.float_array(logits, "logits", ndim=2)
    validate.number(label_smoothing, "label_smoothing", 0, 1)
    xp = backend.get_array_module(logits, labels)
    if not hasattr(labels, "dtype") or labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    N, classes = logits.shape
    _checks.shape_is(labels, "labels", (N,))
    if N == 0:
        raise ValueError("logits must hold at least one sample, got shape (0, classes)")
    if check_labels and bool(((labels < 0) | (labels >= classes)).any()):  # a sync on a GPU
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(f"labels must lie in [0, {classes - 1}] for {classes} classes, "
                         f"got values from {lo} to {hi}")
    shifted = logits - logits.max(axis=1, keepdims=True)  # log-sum-exp shift
    log_z = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_p = shifted - log_z
    rows = xp.arange(N)
    s = float(label_smoothing)
    loss = -log_p[rows, labels].mean()
    dlogits = xp.exp(log_p)
    if s:
        loss = (1 - s) * loss - (s / classes) * log_p.sum(axis=1).mean()
        dlogits -= s / classes
    dlogits[rows, labels] -= 1 - s
    dlogits /= N
    return loss, dlogits


def global_avg_pool2d(x):
    """x (N, C, H, W) -> (N, C): the mean of each channel's plane."""
    _checks.float_array(x, "input", ndim=4)
    return x.mean(axis=(2, 3))


def global_avg_pool2d_backward(dy, input_shape):
    """dy (N, C) -> dx of input_shape (N, C, H, W), each plane filled with dy / (H W)."""
    N, C, H, W = _checks.nchw_shape(input_shape)
    _checks.float_array(dy, "grad_output", ndim=2)
    _checks.shape_is(dy, "grad_output", (N, C))
    xp = backend.get_array_module(dy)
    scaled = dy * dy.dtype.type(1 / (H * W))
    return xp.broadcast_to(scaled[:, :, None, None], (N, C, H, W)).copy()


def global_avg_pool2d_forward(x):
    """(global_avg_pool2d(x), ctx): the ctx for global_avg_pool2d_backward is x's shape."""
    return global_avg_pool2d(x), tuple(x.shape)


def flatten_forward(x):
    """(N, ...) -> ((N, prod(...)), ctx): torch.nn.Flatten's default; the ctx for
    flatten_backward is x's shape."""
    _checks.float_array(x, "input")
    if x.ndim < 2:
        raise ValueError(f"Flatten needs an input with a batch axis, got shape {x.shape}")
    shape = tuple(x.shape)
    return x.reshape(shape[0], math.prod(shape[1:])), shape  # -1 fails for an empty batch


def flatten_backward(dy, input_shape):
    return dy.reshape(input_shape)


def dropout_forward(x, p, stream=None, share=(0, 1)):
    """(y, mask): inverted dropout, each element zeroed with probability p and the
    rest scaled by 1/(1-p). stream: (seed, counter) of the gpucnn.random stream
    whose draw is the mask, or None for the identity (eval, or p = 0): y is then
    x itself and the mask 1. share: (rank, ranks) of a data-parallel run whose
    rank holds rows rank, rank + ranks, ... of the global batch: the mask is drawn
    for the global batch and this rank takes its rows, as one process would."""
    _checks.float_array(x, "input")
    if stream is None:
        return x, 1
    xp = backend.get_array_module(x)
    rank, ranks = share
    # drawn and compared on the host, as on every device (gpucnn.random.host_generator);
    # the GPU gets the bools asynchronously
    drawn = random.host_generator(*stream).random((x.shape[0] * ranks,) + x.shape[1:],
                                                  dtype=x.dtype)
    keep = xp.asarray((drawn if ranks == 1 else drawn[rank::ranks]) >= p)
    scale = 0.0 if p == 1 else 1 / (1 - p)
    mask = keep.astype(x.dtype) * x.dtype.type(scale)
    return x * mask, mask


def dropout_backward(dy, mask):
    return dy * mask
