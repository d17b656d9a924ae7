"""Quartiles (ms) of a 1.8 MB float32 all-reduce on 2 ranks: MPI's blocking
Allreduce against gpucnn's polled MpiCommunicator (Iallreduce and the world's wait),
interleaved (the polled wait spins gpucnn.distributed.world.SPIN_S before it sleeps).

    OMP_NUM_THREADS=1 mpiexec -n 2 python tests/distributed/allreduce_wait.py [steps]
"""
import statistics
import sys
import time

import numpy
from mpi4py import MPI

from gpucnn import distributed as dist

world = dist.get_world()
comm = dist.communicator_for(world, numpy)
a = numpy.ones(450_000, numpy.float32)  # 1.8 MB
blocking, polled = [], []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 200):
    world.barrier()
    t = time.perf_counter()
    world.grad_comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
    blocking.append(time.perf_counter() - t)
    world.barrier()
    t = time.perf_counter()
    comm.allreduce_sum_(a)
    polled.append(time.perf_counter() - t)
if world.is_root:
    def quartiles(v):
        return [round(x * 1e3, 3) for x in statistics.quantiles(v, n=4)]
    print(f"blocking Allreduce ms (q1, median, q3): {quartiles(blocking)}; "
          f"polled: {quartiles(polled)}")
