"""A stand-in of ``cupy.cuda.nccl`` for the tests, backed by MPI.

Its ``NcclCommunicator(ndev, commId, rank)`` takes what CuPy's takes and its
collectives take what CuPy's take: device pointers (``array.data.ptr`` of the
CuPy stand-in's arrays, which are NumPy memory), an element count, NCCL's data
type and operation codes, and a stream handle. It reads and writes that memory
through the pointers, as NCCL reads and writes GPU memory, and sums or
broadcasts it across the ranks of MPI_COMM_WORLD (a communicator duplicated at
init, which, like ncclCommInitRank, every rank must join). Nothing it does is a
device->host synchronisation of the CuPy stand-in.

It also checks what NCCL would refuse or get wrong: every rank must pass the same
unique id (the one rank 0 made and broadcast), its own rank and the world's size,
and the same collective with the same count and type in the same order (each call
is checked against the other ranks'). ``calls`` lists every collective made, with
its stream handle, for the tests to read.

gpucnn is told to use it through its one seam, ``gpucnn.distributed.set_nccl_module``.
"""
import ctypes
import secrets

import numpy

NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN = 0, 1, 2, 3
_TYPES = {NCCL_INT8: numpy.int8, NCCL_UINT8: numpy.uint8, NCCL_INT32: numpy.int32,
          NCCL_UINT32: numpy.uint32, NCCL_INT64: numpy.int64, NCCL_UINT64: numpy.uint64,
          NCCL_FLOAT16: numpy.float16, NCCL_FLOAT32: numpy.float32, NCCL_FLOAT64: numpy.float64}
available = True
calls = []  # (operation, count, dtype, op or root, stream handle) of every collective

class NcclError(RuntimeError):
    pass


def get_version():
    return 22304  # NCCL 2.23.4, as ncclGetVersion encodes it


def get_unique_id():
    """128 bytes as CuPy gives them: a tuple of ints (signed chars)."""
    return tuple(b - 256 if b > 127 else b for b in secrets.token_bytes(128))


def _memory(ptr, count, datatype):
    """The count elements of NCCL type datatype at address ptr, as a NumPy array."""
    dtype = numpy.dtype(_TYPES[datatype])
    buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return numpy.frombuffer(buffer, dtype=dtype, count=count)


class NcclCommunicator:
    def __init__(self, ndev, commId, rank):
        from mpi4py import MPI
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD.Dup()
        if ndev != self._comm.Get_size() or rank != self._comm.Get_rank():
            raise NcclError(f"ncclInvalidArgument: rank {rank} of {ndev} given, MPI says "
                            f"{self._comm.Get_rank()} of {self._comm.Get_size()}")
        ids = self._comm.allgather(tuple(commId))
        if any(i != ids[0] for i in ids) or len(ids[0]) != 128:
            raise NcclError("ncclInvalidUsage: the ranks passed different unique ids")
        self._rank, self._size = rank, ndev

    def _agree(self, call):
        """Every rank must make the same collective, with the same count and type."""
        calls.append(call)
        seen = self._comm.allgather(call[:4])
        if any(s != seen[0] for s in seen):
            raise NcclError(f"ncclInvalidUsage: the ranks made different collectives: {seen}")

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        self._agree(("allReduce", count, datatype, op, stream))
        ops = {NCCL_SUM: self._mpi.SUM, NCCL_PROD: self._mpi.PROD, NCCL_MAX: self._mpi.MAX,
               NCCL_MIN: self._mpi.MIN}
        recv = _memory(recvbuf, count, datatype)
        send = self._mpi.IN_PLACE if sendbuf == recvbuf else _memory(sendbuf, count, datatype)
        self._comm.Allreduce(send, recv, op=ops[op])

    def broadcast(self, sendbuf, recvbuf, count, datatype, root, stream):
        self._agree(("broadcast", count, datatype, root, stream))
        recv = _memory(recvbuf, count, datatype)
        if self._rank == root and sendbuf != recvbuf:
            recv[...] = _memory(sendbuf, count, datatype)
        self._comm.Bcast(recv, root=root)

    def bcast(self, buff, count, datatype, root, stream):
        self.broadcast(buff, buff, count, datatype, root, stream)

    def rank_id(self):
        return self._rank

    def size(self):
        return self._size

    def device_id(self):
        return 0

    def destroy(self):
        self._comm.Free()

    def abort(self):
        self._comm.Abort(1)
