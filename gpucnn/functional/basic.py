"""ReLU, Linear and softmax cross-entropy, forward and backward.

    relu:    y = max(x, 0);           dx = dy * [x > 0]  (0 at exactly 0)
    linear:  y = x w^T + b;           dx = dy w, dw = dy^T x, db = sum_n dy   (w is (out, in))
    loss:    L = -(1/N) sum_n log softmax(z_n)[y_n];  dz = (softmax(z) - onehot(y)) / N
"""
from .. import backend
from . import _checks


def relu(x):
    _checks.float_array(x, "input")
    xp = backend.get_array_module(x)
    return xp.maximum(x, 0)


def relu_backward(dy, x):
    _checks.float_array(x, "input")
    _checks.float_array(dy, "grad_output")
    _checks.same_dtype("input", x, grad_output=dy)
    _checks.shape_is(dy, "grad_output", x.shape)
    backend.get_array_module(dy, x)
    return dy * (x > 0)


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


def linear_backward(dy, x, weight):
    """(dx, dweight, dbias) given dy of shape (N, out)."""
    _linear_checks(x, weight)
    _checks.float_array(dy, "grad_output", ndim=2)
    _checks.same_dtype("input", x, grad_output=dy)
    _checks.shape_is(dy, "grad_output", (x.shape[0], weight.shape[0]))
    backend.get_array_module(dy, x, weight)
    return dy @ weight, dy.T @ x, dy.sum(axis=0)


def softmax_cross_entropy(logits, labels, *, check_labels=True):
    """(loss, dlogits): the batch-mean cross-entropy of softmax(logits) against
    integer labels, and its gradient. logits (N, classes), labels (N,) ints.

    check_labels: raise ValueError for a label outside [0, classes). On a GPU that
    reads one value back (a synchronisation); the training step passes False and
    the labels are checked once per dataset instead (gpucnn.step.check_labels).
    """
    _checks.float_array(logits, "logits", ndim=2)
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
    loss = -log_p[rows, labels].mean()
    dlogits = xp.exp(log_p)
    dlogits[rows, labels] -= 1
    dlogits /= N
    return loss, dlogits
