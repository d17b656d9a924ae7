"""A model's state across the ranks: the same start everywhere, the same running
statistics before a checkpoint or an evaluation, and a digest to compare."""
import hashlib

import numpy

from .. import backend
from .comm import model_communicator
from .world import DistributedError, World


def broadcast_state(model, comm_or_world, root=0):
    """Every parameter and buffer <- root's, in place (state_dict's order), so that
    every rank starts from the same model. Returns model."""
    comm = model_communicator(model, comm_or_world)
    if comm.size == 1:
        return model
    for _, item in model._named_state():
        a = item.data
        if a.flags.c_contiguous:
            comm.broadcast_(a, root)
        else:  # a view with strides: broadcast a copy, then write it back
            tmp = a.copy()
            comm.broadcast_(tmp, root)
            a[...] = tmp
    return model


def average_buffers(model, world):
    """Each floating-point buffer (BatchNorm's running statistics) <- its mean over
    the ranks: sum / R, computed on the host the same way on every rank, so every
    rank holds the same bits afterwards. Where all ranks hold the same value already
    (sync-BN) it is kept as it is (the mean of R equal floats need not round back to
    it). Integer buffers (batch counts) are the same on every rank and are left.
    Once per evaluation or checkpoint: it reads the buffers to the host, and every
    rank's reach every rank in one gather, summed there in rank order."""
    if not isinstance(world, World):
        raise DistributedError(f"world must be a World, got {type(world).__name__}")
    if not world.is_distributed:
        return model
    bufs = [buf for _, buf in model.named_buffers() if buf.data.dtype.kind == "f"]
    everyone = world.allgather_host([backend.to_numpy(buf.data) for buf in bufs])
    for i, buf in enumerate(bufs):
        values = [theirs[i] for theirs in everyone]
        total, same = values[0], numpy.ones(values[0].shape, bool)
        for v in values[1:]:
            total, same = total + v, same & (v == values[0])
        own = values[world.rank]
        mean = numpy.where(same, own, total / own.dtype.type(world.size))
        buf.data[...] = backend.to_device(mean.astype(own.dtype), backend.device_of(buf.data))
    return model


def state_digest(model):
    """SHA-256 (hex) of the model's state: every parameter's and buffer's name, dtype,
    shape and bytes, in state_dict's order. Equal on two ranks exactly when their
    states are the same bits. Reads the state to the host."""
    h = hashlib.sha256()
    for name, item in model._named_state():
        a = numpy.ascontiguousarray(backend.to_numpy(item.data))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def differing_ranks(world, value):
    """The ranks whose value (anything picklable that compares with ==: a digest, a
    config) differs from rank 0's; the same list on every rank (a collective)."""
    values = world.allgather_host(value)
    return [r for r, v in enumerate(values) if v != values[0]]
