"""``gpucnn bench --distributed``, under an MPI launcher: data-parallel training
steps on R ranks against one process doing the same global batch.

    mpiexec -n 2 gpucnn bench --distributed --device cpu

For each model, every rank trains on its own batch of b random images, and these
run in turn, all ranks starting each together (the slowest rank's time counts):

- step: a whole step with the gradient all-reduce (gpucnn.distributed.GradientReducer);
- compute: the same step without it;
- all-reduce: the step's gradient buckets summed with nothing else running.

wait is the time a step waits for its all-reduce: on the CPU what the reducer's
finish() spends in MPI's waits (which includes waiting for the slowest rank), on a
GPU step - compute (NCCL's waits do not block the host). share = wait / step;
overlap = 1 - wait / all-reduce, the part of the all-reduce hidden behind backward
(MPICH progresses a nonblocking all-reduce on the CPU only inside MPI calls unless
MPIR_CVAR_ASYNC_PROGRESS=1). Then rank 0 alone (the others wait) runs the global
batch R*b in one process, on the CPU with R of gpucnn's threads; ratio is that
process's step time over the ranks' (above 1: the ranks are faster). Rank 0 prints.
"""
import json
import statistics
import time

import numpy

import gpucnn

from .. import backend, distributed
from ..app import models
from ..backends.cpu import threads as cpu_threads
from ..errors import UserError
from ..step import train_step

CASES = (("lenet", 64), ("resnet", 32))  # (model, batch per rank)
SMOKE = (("lenet", 4),)
WARMUP = 2


def _net(name, device):
    gpucnn.manual_seed(0)
    net = models.lenet() if name == "lenet" else models.resnet()
    return net.to(device).train()


def _batch(batch, seed, device):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(numpy.float32)
    y = rng.integers(0, 10, batch)
    return backend.to_device(x, device), backend.to_device(y, device)


def _sync(device):
    if device == "cuda":
        backend.xp_for("cuda").cuda.Device().synchronize()


def _median_ms(fn, repeat, device):
    """Median ms of fn() over repeat runs after WARMUP, in one process."""
    for _ in range(WARMUP):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _interleaved_ms(world, fns, repeat, device):
    """Median ms of each of fns, run in turn (so that a load that comes and goes on a
    shared machine weighs on all alike), every run started on all ranks together;
    the slowest rank's time of each run counts."""
    for fn in fns:
        for _ in range(WARMUP):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, into in zip(fns, times):
            world.barrier()
            t0 = time.perf_counter()
            fn()
            _sync(device)
            into.append((time.perf_counter() - t0) * 1e3)
    slowest = numpy.max(numpy.array(world.allgather_host(times)), axis=0)
    return [statistics.median(row) for row in slowest.tolist()]


def _ranks_case(world, name, batch, device, repeat):
    """(step, compute, all-reduce alone, wait in the step's all-reduce) median ms, and
    the reducer's bucket count."""
    net = _net(name, device)
    opt = gpucnn.SGD(net.parameters(), lr=0.01, momentum=0.9)
    comm = distributed.communicator_for(world, backend.xp_for(device))
    distributed.broadcast_state(net, comm)
    reducer = distributed.GradientReducer(net, comm)
    x, y = _batch(batch, world.rank, device)

    def allreduce_alone():
        for pending in [comm.start_allreduce_sum_(b.buffer) for b in reducer.buckets]:
            pending.wait()
    step, compute, alone = _interleaved_ms(
        world, [lambda: train_step(net, opt, x, y, reducer=reducer),
                lambda: train_step(net, opt, x, y), allreduce_alone], repeat, device)
    t = reducer.timings
    wait = (max(world.allgather_host(t["wait_s"] / t["steps"] * 1e3)) if device == "cpu"
            else max(0.0, step - compute))
    reducer.close()
    return step, compute, alone, wait, len(reducer.buckets)


def _one_process_case(world, name, batch, device, repeat):
    """Rank 0's step time for the global batch in one process (CPU: R threads); the
    other ranks wait meanwhile. None on the other ranks."""
    result = None
    if world.is_root:
        before = cpu_threads.get_num_threads()
        if device == "cpu":
            cpu_threads.set_num_threads(world.size)
        try:
            net = _net(name, device)
            opt = gpucnn.SGD(net.parameters(), lr=0.01, momentum=0.9)
            x, y = _batch(batch * world.size, 0, device)
            result = _median_ms(lambda: train_step(net, opt, x, y), repeat, device)
        finally:
            cpu_threads.set_num_threads(before)
    world.barrier()
    return result


def run(device="auto", repeat=10, smoke=False, out=print):
    world = distributed.get_world()
    if not world.is_distributed:
        raise UserError("gpucnn bench --distributed times several ranks: start it with the MPI "
                        "launcher, e.g. mpiexec -n 2 gpucnn bench --distributed --device cpu")
    device = backend.resolve_device(device)[0]
    if device == "cpu":
        cpu_threads.set_num_threads(1)
    say = out if world.is_root else (lambda *a, **k: None)
    library = " ".join(str(distributed.mpi_library_version()).split())
    threads = f", 1 thread each; one process: {world.size} threads" if device == "cpu" else ""
    say(f"gpucnn bench --distributed: {world.size} ranks ({library}) on {device}{threads}; "
        f"medians of {repeat} steps")
    say(f"{'model':<8}{'batch':>9}{'step':>8}{'compute':>9}{'wait':>7}{'share':>7}"
        f"{'all-reduce':>12}{'overlap':>9}{'buckets':>9}{'1 process':>11}{'ratio':>7}")
    rows = []
    for name, batch in (SMOKE if smoke else CASES):
        step, compute, alone, wait, buckets = _ranks_case(world, name, batch, device, repeat)
        single = _one_process_case(world, name, batch, device, repeat)
        row = {"model": name, "batch_per_rank": batch, "ranks": world.size, "step_ms": step,
               "compute_ms": compute, "wait_ms": wait, "comm_share": wait / step,
               "allreduce_ms": alone, "overlap": _overlap(wait, alone), "buckets": buckets,
               "one_process_ms": single, "ratio": single / step if single else None}
        rows.append(row)
        if world.is_root:
            say(f"{name:<8}{f'{batch} x {world.size}':>9}{step:>8.1f}{compute:>9.1f}"
                f"{wait:>7.1f}{100 * row['comm_share']:>6.0f}%{alone:>12.2f}"
                f"{_percent(row['overlap']):>9}{buckets:>9}{single:>11.1f}{row['ratio']:>7.2f}")
    return rows


def _overlap(wait, alone):
    """The part of the all-reduce that ran while backward still computed: 1 - (what the
    step waited for) / (the all-reduce alone), within [0, 1]."""
    return min(1.0, max(0.0, 1 - wait / alone)) if alone > 0 else None


def _percent(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def main(device="auto", repeat=10, smoke=False, json_path=None):
    rows = run(device, repeat, smoke)
    world = distributed.get_world()
    if json_path and world.is_root:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
