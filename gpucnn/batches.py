"""batches(x, y, batch_size): mini-batches over arrays, DataLoader's everyday use.

    for xb, yb in gpucnn.batches(x_train, y_train, 64, shuffle=True, seed=epoch):
        gpucnn.train_step(model, optimizer, xb, yb)

x and y are NumPy or CuPy arrays (or anything gpucnn.backend.as_array takes: a
PyTorch tensor, a JAX array) with one sample per row along axis 0; each batch is
a slice of them on their device (a view when not shuffled, a gathered copy when
shuffled). y=None yields x's batches alone.
"""
import numpy

from . import backend, random, validate

__all__ = ["batches"]


def _rows(a, name):
    a = backend.as_array(a)
    if not hasattr(a, "shape") or len(a.shape) == 0:
        raise TypeError(f"{name} must be an array with one sample per row (axis 0), got "
                        f"{type(a).__name__}{' of shape ()' if hasattr(a, 'shape') else ''}")
    return a


def batches(x, y=None, batch_size=32, shuffle=False, seed=None, drop_last=False):
    """Yield (x[i:i+batch_size], y[i:i+batch_size]) over the rows of x and y (x's
    batches alone where y is None), in order or, with shuffle, in an order drawn
    from numpy.random.default_rng(seed) (seed None: gpucnn's generator, which
    gpucnn.manual_seed seeds). drop_last leaves out a last, smaller batch.
    Arguments are checked when called, before the first batch is asked for."""
    x = _rows(x, "x")
    if y is not None:
        y = _rows(y, "y")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y must hold the same number of samples, got {x.shape[0]} "
                             f"and {y.shape[0]}")
    batch_size = validate.positive_int(batch_size, "batch_size", type_error=TypeError)
    validate.boolean(shuffle, "shuffle")
    validate.boolean(drop_last, "drop_last")
    if seed is not None:
        seed = validate.integer(seed, "seed", 0, type_error=TypeError, what="None or an int >= 0")
    n = x.shape[0]
    order = None
    if shuffle:
        rng = random.host_rng() if seed is None else numpy.random.default_rng(seed)
        order = rng.permutation(n)
    stop = n - n % batch_size if drop_last else n
    return _generate(x, y, batch_size, order, stop)


def _generate(x, y, batch_size, order, stop):
    # the shuffled order on each array's own device (x and y may be on different ones)
    x_order, y_order = (None, None) if order is None else (
        backend.get_array_module(a).asarray(order) if a is not None else None for a in (x, y))
    for start in range(0, stop, batch_size):
        window = slice(start, start + batch_size)
        xb = x[window] if order is None else x[x_order[window]]
        if y is None:
            yield xb
        else:
            yield xb, (y[window] if order is None else y[y_order[window]])
