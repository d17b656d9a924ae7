"""Data-parallel training over MPI ranks: one process per GPU (or per CPU share),
started by ``mpiexec``/``srun``; gradients summed with NCCL on GPUs and MPI on CPUs.

    from gpucnn import distributed as dist
    world = dist.get_world()                      # size 1 unless an MPI launcher started us
    comm = dist.communicator_for(world, xp)       # NCCL for CuPy, MPI for NumPy
    dist.broadcast_state(model, comm)             # rank 0's weights everywhere
    reducer = dist.GradientReducer(model, comm)   # bucketed all-reduce during backward
    for idx in batches_of(dist.shard(order, world.rank, world.size, b), b):
        gpucnn.train_step(model, opt, x[idx], y[idx], reducer=reducer)
    dist.average_buffers(model, world)            # before evaluating or saving

mpi4py is imported only in a process an MPI launcher started (get_world), CuPy's
NCCL only when a NcclCommunicator is made. docs/distributed.md has the design,
the rules for shards and buckets, and the equations of sync-BN.
"""
from .comm import (
                   Communicator,
                   LocalCommunicator,
                   MpiCommunicator,
                   NcclCommunicator,
                   communicator_for,
                   nccl_version,
                   set_nccl_module,
)
from .reducer import DEFAULT_BUCKET_BYTES, GradientReducer, plan_buckets
from .shard import shard, shard_eval, steps_per_epoch
from .state import average_buffers, broadcast_state, differing_ranks, state_digest
from .syncbn import convert_sync_batchnorm
from .world import (
                   DEFAULT_TIMEOUT,
                   Agreement,
                   DistributedError,
                   World,
                   get_world,
                   launched_by_mpi,
                   mpi_library_version,
)

__all__ = [
                   "DEFAULT_BUCKET_BYTES",
                   "DEFAULT_TIMEOUT",
                   "Agreement",
                   "Communicator",
                   "DistributedError",
                   "GradientReducer",
                   "LocalCommunicator",
                   "MpiCommunicator",
                   "NcclCommunicator",
                   "World",
                   "average_buffers",
                   "broadcast_state",
                   "communicator_for",
                   "convert_sync_batchnorm",
                   "differing_ranks",
                   "get_world",
                   "launched_by_mpi",
                   "mpi_library_version",
                   "nccl_version",
                   "plan_buckets",
                   "set_nccl_module",
                   "shard",
                   "shard_eval",
                   "state_digest",
                   "steps_per_epoch",
]
