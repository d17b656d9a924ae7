"""Which samples each rank takes.

Training: every rank draws the same global permutation of the n training samples
(from the run's seed and epoch) and rank r of R takes every R-th entry of it,
``order[r::R]``, after the remainder that does not fill a whole global batch of
R*b has been dropped. Then rank r's t-th batch of b and the t-th single-process
batch of R*b hold the same samples (positions t*R*b to (t+1)*R*b of the
permutation), every rank runs the same number of steps, n // (R*b), and no sample
is taken twice in an epoch. The n mod (R*b) dropped samples are a different set
each epoch, since the permutation is.

Evaluation: contiguous ranges, rank r the r-th of R nearly equal parts (the first
n mod R ranks one sample more), so that every test sample is counted exactly once
and the ranks' correct counts and loss sums add up to the single-process ones.
"""
import numpy

from .. import validate
from .world import DistributedError


def _rank_size(rank, size):
    size = validate.positive_int(size, "size", error=DistributedError)
    rank = validate.integer(rank, "rank", 0, error=DistributedError)
    if rank >= size:
        raise DistributedError(f"rank must lie in [0, {size - 1}] for a world of {size}, got "
                               f"{rank}")
    return rank, size


def steps_per_epoch(n, size, batch_size):
    """How many steps every rank runs over n training samples: n // (size * batch_size).
    DistributedError where that is 0 (the set fills no global batch)."""
    n = validate.integer(n, "n", 0, error=DistributedError)
    size = validate.positive_int(size, "size", error=DistributedError)
    batch_size = validate.positive_int(batch_size, "batch_size", error=DistributedError)
    steps = n // (size * batch_size)
    if steps == 0:
        raise DistributedError(f"{n} training samples fill no global batch of {size} ranks x "
                               f"batch_size {batch_size} = {size * batch_size}; use a smaller "
                               "batch_size or fewer ranks")
    return steps


def shard(order, rank, size, batch_size):
    """Rank `rank`'s training samples for one epoch, in the order to batch them (its
    t-th batch is entries [t*batch_size, (t+1)*batch_size)): order[r::R] of the
    global permutation `order` (a 1-D integer array, the same on every rank; an int
    n means range(n)) cut to steps_per_epoch * R * batch_size entries first."""
    rank, size = _rank_size(rank, size)
    if validate.is_int(order):
        order = numpy.arange(validate.integer(order, "order", 0, error=DistributedError))
    order = numpy.asarray(order)
    if order.ndim != 1 or order.dtype.kind not in "iu":
        raise DistributedError(f"order must be an int or a 1-D integer array of sample indices, "
                               f"got an array of shape {order.shape} and dtype {order.dtype}")
    used = steps_per_epoch(len(order), size, batch_size) * size * batch_size
    return order[:used][rank::size]


def shard_eval(n, rank, size):
    """slice(start, stop) of the n evaluation samples that rank `rank` of `size`
    takes: contiguous, disjoint, covering all n; the first n mod size ranks take
    one more (a rank may take none when n < size)."""
    n = validate.integer(n, "n", 0, error=DistributedError)
    rank, size = _rank_size(rank, size)
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))
