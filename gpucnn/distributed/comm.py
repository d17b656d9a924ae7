"""Communicators for device arrays: one interface over MPI (NumPy arrays, the CPU)
and NCCL (CuPy arrays, the GPU).

    comm = communicator_for(world, xp)
    comm.allreduce_sum_(a)            # a <- the sum of every rank's a, in place
    pending = comm.start_allreduce_sum_(a); ...; pending.wait()
    comm.broadcast_(a, root=0)        # a <- root's a, in place

On the GPU an all-reduce is queued, never waited for on the host: NCCL runs it on
the communicator's own stream after the work queued so far on the current stream
(an event), and ``wait()`` makes the current stream wait for it (another event),
so a bucket's all-reduce overlaps the rest of backward and a CUDA graph can
capture both. On the CPU, MPI's nonblocking Iallreduce, waited for with the
world's timeout.

NCCL is CuPy's ``cupy.cuda.nccl``; tests name a stand-in through the one seam
``set_nccl_module`` (tests/standin/nccl.py), as gpucnn.backend.set_cupy_module
names the CuPy stand-in.
"""
import numpy

from .. import backend
from .world import DistributedError, World, _mpi

# NCCL's ncclDataType_t and ncclRedOp_t values (nccl.h), which cupy.cuda.nccl exports
_NCCL_TYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5,
               "float16": 6, "float32": 7, "float64": 8}
_NCCL_SUM = 0

_nccl_stand_in = None


def set_nccl_module(module):
    """Name the module that plays ``cupy.cuda.nccl`` (None: the real one); returns
    the previous one. The seam for the tests' stand-in, as backend.set_cupy_module."""
    global _nccl_stand_in
    previous, _nccl_stand_in = _nccl_stand_in, module
    return previous


def nccl_module():
    """cupy.cuda.nccl, or the module named by set_nccl_module."""
    if _nccl_stand_in is not None:
        return _nccl_stand_in
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise DistributedError(f"NCCL is not available through CuPy ({e}); install CuPy with "
                               "NCCL (pip install nvidia-nccl-cu12) or train on the CPU") from None
    if not getattr(nccl, "available", True):
        raise DistributedError("CuPy was built without NCCL: install nvidia-nccl-cu12, or "
                               "train on the CPU")
    return nccl


def nccl_version():
    """NCCL's version as 'major.minor.patch', or None where it is not available."""
    try:
        v = int(nccl_module().get_version())
    except (DistributedError, AttributeError, RuntimeError):
        return None
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else \
        f"{v // 1000}.{v // 100 % 10}.{v % 100}"


class Done:
    """A pending operation that is complete already."""

    def wait(self):
        return None


class Communicator:
    """What the gradient reducer and sync-BN need: rank, size, and sums and
    broadcasts of device arrays in place. The same calls in the same order on every
    rank; each rank's result is the same bits."""

    rank, size = 0, 1

    def start_allreduce_sum_(self, array):
        """Begin array <- the sum over the ranks (in place, contiguous); returns a
        pending operation whose wait() must come before array is read."""
        raise NotImplementedError

    def allreduce_sum_(self, array):
        self.start_allreduce_sum_(array).wait()
        return array

    def broadcast_(self, array, root=0):
        """array <- root's array, in place; returns array."""
        raise NotImplementedError


class LocalCommunicator(Communicator):
    """A world of one: every operation leaves the array as it is."""

    def start_allreduce_sum_(self, array):
        return Done()

    def broadcast_(self, array, root=0):
        return array


def _contiguous(array, what):
    if not array.flags.c_contiguous:
        raise DistributedError(f"{what} needs a C-contiguous array, got one of shape "
                               f"{tuple(array.shape)} and strides {array.strides}")
    return array


class _MpiPending:
    def __init__(self, request, world):
        self.request, self.world = request, world

    def wait(self):
        if self.request is not None:
            self.world._watch.wait(self.request, "gradient all-reduce (MPI)")
            self.request = None


class MpiCommunicator(Communicator):
    """MPI on NumPy arrays (the CPU): Iallreduce and Ibcast on the world's gradient
    communicator, waited for with the world's timeout."""

    def __init__(self, world):
        if not world.is_distributed:
            raise DistributedError("MpiCommunicator needs a world of more than one rank; "
                                   "use communicator_for(world, numpy)")
        self.world, self.comm = world, world.grad_comm
        self.rank, self.size = world.rank, world.size

    def start_allreduce_sum_(self, array):
        _contiguous(array, "allreduce_sum_")
        request = self.comm.Iallreduce(_mpi().IN_PLACE, array, op=_mpi().SUM)
        return _MpiPending(request, self.world)

    def broadcast_(self, array, root=0):
        _contiguous(array, "broadcast_")
        self.world._watch.wait(self.comm.Ibcast(array, root=root), "broadcast_ (MPI)")
        return array


class _NcclPending:
    def __init__(self, xp, stream):
        self.xp, self.stream, self.done = xp, stream, None
        self.done = stream.record()

    def wait(self):
        if self.done is not None:
            self.xp.cuda.get_current_stream().wait_event(self.done)
            self.done = None


class NcclCommunicator(Communicator):
    """NCCL through CuPy on CuPy arrays: ncclCommInitRank with a unique id made on
    rank 0 and broadcast over MPI. All-reduces run on the communicator's stream,
    ordered after the current stream's work by an event; nothing waits on the host.
    A world of one is allowed (training uses LocalCommunicator there): NCCL then
    runs one rank, whose sum queues no work, and gpu-check runs the reducer's path
    through it on a single GPU."""

    def __init__(self, world, xp):
        nccl = self.nccl = nccl_module()
        self.world, self.xp, self.rank, self.size = world, xp, world.rank, world.size
        uid = world.bcast_host(nccl.get_unique_id() if world.rank == 0 else None)
        with world.watch("NCCL initialisation"):  # every rank must join: it blocks until then
            self.comm = nccl.NcclCommunicator(world.size, uid, world.rank)
        self.stream = xp.cuda.Stream(non_blocking=True)

    def _type(self, array):
        code = _NCCL_TYPES.get(numpy.dtype(array.dtype).name)
        if code is None:
            raise DistributedError(f"NCCL cannot sum arrays of dtype {array.dtype}")
        return getattr(self.nccl, f"NCCL_{numpy.dtype(array.dtype).name.upper()}", code)

    def start_allreduce_sum_(self, array):
        _contiguous(array, "allreduce_sum_")
        ready = self.xp.cuda.get_current_stream().record()
        self.stream.wait_event(ready)
        ptr = array.data.ptr
        self.comm.allReduce(ptr, ptr, array.size, self._type(array),
                            getattr(self.nccl, "NCCL_SUM", _NCCL_SUM), self.stream.ptr)
        return _NcclPending(self.xp, self.stream)

    def broadcast_(self, array, root=0):
        _contiguous(array, "broadcast_")
        stream = self.xp.cuda.get_current_stream()
        ptr = array.data.ptr
        self.comm.broadcast(ptr, ptr, array.size, self._type(array), root, stream.ptr)
        return array


def communicator_for(world, xp):
    """The communicator for arrays of module xp in world: LocalCommunicator in a
    world of one, MpiCommunicator for NumPy, NcclCommunicator for CuPy (or its
    stand-in); made once per world and array module, and kept (a world whose
    timeout get_world changed is the same world here)."""
    if not world.is_distributed:
        return LocalCommunicator()
    key = (id(world.grad_comm), xp)
    comm = _made.get(key)
    if comm is None:
        comm = _made[key] = MpiCommunicator(world) if xp is numpy else NcclCommunicator(world, xp)
    return comm


_made = {}  # (the world's gradient communicator, xp) -> its Communicator


def model_communicator(model, comm_or_world, accepted="a World or a Communicator"):
    """comm_or_world as a Communicator: itself, or a World's communicator for the
    array module of the model's parameters (NumPy for a model without any)."""
    if isinstance(comm_or_world, Communicator):
        return comm_or_world
    if isinstance(comm_or_world, World):
        params = model.parameters()
        xp = backend.get_array_module(params[0].data) if params else numpy
        return communicator_for(comm_or_world, xp)
    raise DistributedError(f"comm_or_world must be {accepted}, got "
                           f"{type(comm_or_world).__name__}")
