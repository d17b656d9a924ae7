"""One training step, the one every caller uses (train, bench, the tests, the CUDA graph).

    loss, logits = train_step(model, optimizer, x, y)

forward, softmax cross-entropy, backward, optimizer step: nothing in it reads a
device value back to the host, so on a GPU the step is queued without a single
synchronisation (and can be captured into a CUDA graph). The labels are not
range-checked here (that needs a sync on a GPU): check them once per dataset
with ``check_labels``, as ``gpucnn.train`` does.
"""
from . import backend
from . import functional as F


def train_step(model, optimizer, x, y, *, label_smoothing=0.0, reducer=None):
    """Run one SGD/Adam step on the batch (x, y); returns (loss, logits) as device
    arrays: the batch-mean loss (0-d) and the logits, read them when needed. x and y
    may be any arrays offering __dlpack__ or __array__ (PyTorch tensors among them).
    reducer: a gpucnn.distributed.GradientReducer, which averages the gradients
    across the ranks of a data-parallel run before the optimizer's step (its
    buckets start during backward); None in a single process."""
    x, y = backend.as_array(x), backend.as_array(y)
    # one section for the whole step: the CPU's threads (and its BLAS held to one
    # thread) are taken once, not pass by pass; nothing on a GPU
    with backend.ops_for(backend.get_array_module(x)).section():
        optimizer.zero_grad()
        if reducer is not None:
            reducer.begin()
        logits = model.forward(x)
        kwargs = {"label_smoothing": label_smoothing} if label_smoothing else {}
        loss, dlogits = F.softmax_cross_entropy(logits, y, check_labels=False, **kwargs)
        model.backward(dlogits, need_input_grad=False)
        if reducer is not None:
            reducer.finish()
        optimizer.step()
    return loss, logits


def check_labels(labels, num_classes, name="labels"):
    """Raise ValueError unless every label lies in [0, num_classes); one sync on a GPU.
    Call it once per dataset rather than once per batch."""
    if not hasattr(labels, "dtype") or labels.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got "
                        f"{getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.size == 0:
        return labels
    lo, hi = (int(v) for v in backend.to_numpy(
        backend.get_array_module(labels).stack([labels.min(), labels.max()])))
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                         f"got values from {lo} to {hi}")
    return labels
