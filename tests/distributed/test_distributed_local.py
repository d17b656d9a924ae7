"""gpucnn.distributed in one process (no MPI needed): the world of one, the rules for
shards and buckets, the backward-done hook, the reducer's single-process bits, and
sync-BN's equations with ranks played by threads."""
import gc
import os
import subprocess
import sys
import threading
import weakref

import mpi_cases as cases
import numpy
import pytest

import gpucnn
import gpucnn.functional as F
from gpucnn import distributed as dist
from gpucnn import nn
from gpucnn.nn.module import add_backward_done_hook

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- the world ---------------------------------------------------------------------------

def test_a_plain_process_is_a_world_of_one_without_mpi():
    """Without a launcher's variables: size 1, and mpi4py is not even imported."""
    env = {k: v for k, v in os.environ.items()
           if k not in dist.world.LAUNCHER_VARIABLES and not k.startswith(("SLURM", "GPUCNN_MPI"))}
    code = ("import sys, gpucnn, gpucnn.distributed as d; w = d.get_world(); "
            "print(w.size, w.rank, 'mpi4py' in sys.modules, 'mpi4py.MPI' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout.split()
    assert out == ["1", "0", "False", "False"]


@pytest.mark.parametrize("env, launched", [
    ({}, False),
    ({"PMI_SIZE": "2", "PMI_RANK": "0"}, True),          # MPICH / Intel MPI hydra
    ({"PMI_SIZE": "1", "PMI_RANK": "0"}, False),         # mpiexec -n 1: nothing to join
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),               # Open MPI
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"PMIX_RANK": "3"}, True),                          # PMIx: srun --mpi=pmix, Open MPI 5
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}, True),  # srun: _mpi_world checks PMI
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "8"}, False),  # sbatch's script itself
    ({"PMI_SIZE": "2", "GPUCNN_MPI": "0"}, False),
    ({"GPUCNN_MPI": "1"}, True)])
def test_launcher_detection(env, launched):
    assert dist.launched_by_mpi(env) is launched


def test_world_of_one_collectives_return_their_argument(capsys):
    w = dist.World()
    assert not w.is_distributed and w.is_root
    assert w.allreduce_host(3) == 3 and isinstance(w.allreduce_host(3), int)
    assert w.allreduce_host(2.5, "max") == 2.5
    a = numpy.array([1.0, 2.0])
    out = w.allreduce_host(a, "min")
    assert numpy.array_equal(out, a) and out is not a
    assert w.bcast_host({"x": 1}) == {"x": 1} and w.allgather_host(7) == [7]
    w.barrier()
    handle = w.agree_later(4)
    assert handle.done() and handle.result() == 4
    with w.watch("nothing"):
        pass
    with pytest.raises(SystemExit) as e:
        w.abort("stopping here", 5)
    assert e.value.code == 5
    assert capsys.readouterr().err == "gpucnn: stopping here\n"


def test_device_index_and_argument_errors():
    w = dist.World(rank=5, size=8, local_rank=5, local_size=8)
    assert [w.device_index(n) for n in (1, 2, 4, 8)] == [0, 1, 1, 5]
    with pytest.raises(dist.DistributedError, match="num_gpus must be a positive int, got 0"):
        w.device_index(0)
    with pytest.raises(dist.DistributedError, match=r"op must be one of \('sum', 'max', 'min'\)"):
        dist.World().allreduce_host(1, "mean")
    with pytest.raises(dist.DistributedError, match="allreduce_host value must be an int"):
        dist.World().allreduce_host("1")
    with pytest.raises(dist.DistributedError, match=r"root must be a rank in \[0, 0\], got 1"):
        dist.World().bcast_host(1, root=1)
    with pytest.raises(dist.DistributedError, match="timeout must be a positive number, got -1"):
        dist.get_world(timeout=-1)
    assert isinstance(dist.communicator_for(dist.World(), numpy), dist.LocalCommunicator)


# --- shards ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, size, batch", [(80, 2, 4), (20, 3, 2), (23, 3, 2), (7, 1, 3)])
def test_rank_batches_make_up_the_single_process_batches(n, size, batch):
    """Rank r's t-th batch of b, over every rank, holds the samples of the one-process
    t-th batch of R*b; every rank has n // (R*b) of them; the remainder is dropped."""
    order = numpy.random.default_rng(n).permutation(n)
    steps = dist.steps_per_epoch(n, size, batch)
    assert steps == n // (size * batch)
    shards = [dist.shard(order, r, size, batch) for r in range(size)]
    assert all(len(s) == steps * batch for s in shards)
    B = size * batch
    for t in range(steps):
        together = numpy.concatenate([s[t * batch:(t + 1) * batch] for s in shards])
        assert sorted(together) == sorted(order[t * B:(t + 1) * B])
    assert numpy.array_equal(dist.shard(n, 0, size, batch), numpy.arange(steps * B)[::size])


@pytest.mark.parametrize("n, size", [(10, 3), (2, 3), (0, 2), (9, 3), (1000, 7)])
def test_evaluation_parts_cover_every_sample_once(n, size):
    parts = [dist.shard_eval(n, r, size) for r in range(size)]
    assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]]
    assert parts[-1].stop == n
    counts = [p.stop - p.start for p in parts]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_shard_errors_name_the_argument():
    with pytest.raises(dist.DistributedError, match=r"rank must lie in \[0, 2\] for a world of "
                                                    r"3, got 3"):
        dist.shard(10, 3, 3, 1)
    with pytest.raises(dist.DistributedError, match="10 training samples fill no global batch "
                                                    "of 3 ranks x batch_size 4 = 12"):
        dist.shard(10, 0, 3, 4)
    with pytest.raises(dist.DistributedError, match="order must be an int or a 1-D integer"):
        dist.shard(numpy.zeros(10), 0, 2, 1)
    with pytest.raises(dist.DistributedError, match="size must be a positive int, got 0"):
        dist.shard_eval(10, 0, 0)


# --- buckets, hooks and the reducer in one process ---------------------------------------

def _p(*shape, dtype=numpy.float32):
    return nn.Parameter(numpy.zeros(shape, dtype))


def test_buckets_in_reverse_order_capped_and_one_dtype_each():
    named = [("a", _p(10)), ("b", _p(10)), ("c", _p(100)), ("d", _p(3, dtype=numpy.float64)),
             ("e", _p(5, dtype=numpy.float64))]
    names = [[n for n, _ in b] for b in dist.plan_buckets(named, 80)]
    assert names == [["e", "d"], ["c"], ["b", "a"]]  # c (400 bytes) alone; a dtype apiece
    assert [[n for n, _ in b] for b in dist.plan_buckets(named, 2**20)] == [["e", "d"],
                                                                           ["c", "b", "a"]]


def test_backward_done_hooks_run_after_each_layer_in_backward_order():
    gpucnn.manual_seed(0)
    body = nn.Sequential(nn.Conv2D(2, 2, 3, padding=1), nn.ReLU())
    block = nn.Residual(body, nn.Conv2D(2, 2, 1))
    model = nn.Sequential(nn.Conv2D(1, 2, 3, padding=1), block, nn.Flatten(), nn.Linear(32, 3))
    seen = []
    removers = [add_backward_done_hook(m, lambda m, name=name: seen.append(name))
                for name, m in model.named_modules() if name]
    y = model.forward(numpy.ones((2, 1, 4, 4), numpy.float32))
    model.backward(numpy.ones_like(y))
    assert seen == ["3", "2", "1.body.1", "1.body.0", "1.body", "1.shortcut", "1", "0"]
    for remove in removers:
        remove()
    model.forward(numpy.ones((2, 1, 4, 4), numpy.float32))
    model.backward(numpy.ones_like(y))
    assert len(seen) == 8


def test_the_reducer_in_a_world_of_one_changes_no_bit(cpu_threads):
    """train_step with a reducer over one rank (sum of one, times 1.0) gives the bits of
    train_step without one: the hooks and buckets change nothing else."""
    cpu_threads(1)
    x, y = cases.data(dtype=numpy.float32)
    runs = []
    for use in (False, True):
        model = cases.lenet(dtype=numpy.float32, bn=True)
        reducer = dist.GradientReducer(model, dist.LocalCommunicator(), 300) if use else None
        losses = cases.train(model, x, y, cases.batches(0, 1, 8, 3), reducer)
        runs.append((losses, cases._state(model)))
    assert numpy.array_equal(runs[0][0], runs[1][0])
    for k, v in runs[0][1].items():
        assert numpy.array_equal(v, runs[1][1][k]), k


def test_reducer_errors():
    model = cases.lenet()
    with pytest.raises(dist.DistributedError, match="model must be a gpucnn Module, got list"):
        dist.GradientReducer([], dist.LocalCommunicator())
    with pytest.raises(dist.DistributedError, match="communicator must be a gpucnn.distributed "
                                                    "Communicator, got World"):
        dist.GradientReducer(model, dist.World())
    with pytest.raises(dist.DistributedError, match="bucket_bytes must be a positive int"):
        dist.GradientReducer(model, dist.LocalCommunicator(), 0)
    with pytest.raises(dist.DistributedError, match=r"finish\(\) without begin\(\)"):
        dist.GradientReducer(model, dist.LocalCommunicator()).finish()
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    reducer = dist.GradientReducer(twice, dist.LocalCommunicator())
    reducer.begin()
    y = twice.forward(numpy.ones((2, 4), numpy.float32))
    with pytest.raises(dist.DistributedError, match="Linear's backward ran twice in one step"):
        twice.backward(numpy.ones_like(y))


# --- sync-BN with ranks played by threads -------------------------------------------------

class ThreadRanks:
    """size threads in one process playing ranks: sums in rank order, the same bits on
    every 'rank', as a real communicator's are."""

    def __init__(self, size):
        self.size, self.barrier, self.slots = size, threading.Barrier(size), [None] * size

    def run(self, fn):
        """[fn(communicator of rank r) for each rank r], each in its own thread."""
        out, errors = [None] * self.size, []

        def one(r):
            try:
                out[r] = fn(_ThreadComm(self, r))
            # a failed rank must not leave the others waiting at the barrier
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


class _ThreadComm(dist.Communicator):
    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def start_allreduce_sum_(self, array):
        g = self.group
        g.slots[self.rank] = array.copy()
        g.barrier.wait()
        total = g.slots[0].copy()
        for s in g.slots[1:]:
            total += s
        g.barrier.wait()
        array[...] = total
        return dist.comm.Done()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_sync_batchnorm_layers_equal_one_batchnorm_over_the_global_batch(cpu_threads, momentum):
    """3 ranks holding 1, 2 and 3 samples of a batch of 6 (float64): the outputs, input
    gradients and running statistics of BatchNorm2D(sync=) equal one BatchNorm2D's
    over the whole batch, and the ranks' weight and bias gradients add up to its."""
    cpu_threads(1)
    rng = numpy.random.default_rng(2)
    x, dy = rng.standard_normal((6, 3, 4, 5)) * 2 - 1, rng.standard_normal((6, 3, 4, 5))
    rows = [slice(0, 1), slice(1, 3), slice(3, 6)]

    def layer(sync=None):
        bn = nn.BatchNorm2D(3, momentum=momentum, sync=sync).double()
        bn.weight.data[...] = [1.5, -0.5, 2.0]
        bn.bias.data[...] = [0.1, 0.2, -0.3]
        return bn

    one = layer()
    want = [(one.forward(x), one.backward(dy)) for _ in range(2)]  # twice: running stats move

    def rank(comm):
        bn = layer(comm)
        got = [(bn.forward(x[rows[comm.rank]]), bn.backward(dy[rows[comm.rank]]))
               for _ in range(2)]
        return got, bn
    results = ThreadRanks(3).run(rank)
    for (got, bn), part in zip(results, rows):
        for (y, dx), (y1, dx1) in zip(got, want):
            numpy.testing.assert_allclose(y, y1[part], rtol=1e-13, atol=1e-13)
            numpy.testing.assert_allclose(dx, dx1[part], rtol=1e-12, atol=1e-13)
        numpy.testing.assert_allclose(bn.running_mean, one.running_mean, rtol=1e-14)
        numpy.testing.assert_allclose(bn.running_var, one.running_var, rtol=1e-14)
        assert int(bn.num_batches_tracked) == 2
    for name in ("weight", "bias"):
        total = sum(getattr(bn, name).grad for _, bn in results)
        numpy.testing.assert_allclose(total, getattr(one, name).grad, rtol=1e-12)


def test_sync_batchnorm_functional_without_weight_and_in_eval(cpu_threads):
    """No affine parameters: dx still matches; eval uses the running statistics and
    never communicates (ranks may evaluate different numbers of batches)."""
    cpu_threads(1)
    rng = numpy.random.default_rng(4)
    x, dy = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 2, 3, 3))
    y1, saved = F.batch_norm(x, training=True)
    dx1 = F.batch_norm_backward(dy, saved)[0]

    def rank(comm):
        part = slice(2 * comm.rank, 2 * comm.rank + 2)
        y, saved = F.batch_norm(x[part], training=True, sync=comm)
        dx, dw, db = F.batch_norm_backward(dy[part], saved)
        assert dw is None and db is None
        return y, dx, part
    for y, dx, part in ThreadRanks(2).run(rank):
        numpy.testing.assert_allclose(y, y1[part], rtol=1e-13, atol=1e-13)
        numpy.testing.assert_allclose(dx, dx1[part], rtol=1e-12, atol=1e-13)

    class Refuses(dist.Communicator):
        def start_allreduce_sum_(self, array):
            raise AssertionError("eval must not communicate")
    bn = nn.BatchNorm2D(2, sync=Refuses()).double().eval()
    bn.backward(bn.forward(x))


def test_convert_sync_batchnorm():
    model = cases.lenet(bn=True)
    comm = _ThreadComm(ThreadRanks(2), 0)
    dist.convert_sync_batchnorm(model, comm)
    assert [m.sync for m in model.modules() if isinstance(m, nn.BatchNorm2D)] == [comm, comm]
    dist.convert_sync_batchnorm(model, None)
    assert all(m.sync is None for m in model.modules() if isinstance(m, nn.BatchNorm2D))
    dist.convert_sync_batchnorm(model, dist.World())  # a world of one: nothing to share
    assert all(m.sync is None for m in model.modules() if isinstance(m, nn.BatchNorm2D))
    with pytest.raises(dist.DistributedError, match="comm_or_world must be a World, a "
                                                    "Communicator or None, got str"):
        dist.convert_sync_batchnorm(model, "mpi")
    with pytest.raises(TypeError, match="sync must be a gpucnn.distributed Communicator or "
                                        "None, got int"):
        nn.BatchNorm2D(3, sync=1)


def test_state_digest_sees_every_bit():
    a, b = cases.lenet(bn=True), cases.lenet(bn=True)
    assert dist.state_digest(a) == dist.state_digest(b)
    b[1].running_var[0] = numpy.nextafter(b[1].running_var[0], 2.0)
    assert dist.state_digest(a) != dist.state_digest(b)
    assert dist.differing_ranks(dist.World(), "x") == []
    assert dist.broadcast_state(a, dist.World()) is a and dist.average_buffers(a, dist.World()) is a


def test_ranks_augment_their_shares_of_the_global_batch_exactly():
    """R ranks (each holding samples r, r + R, ... of a global batch, as shard gives them)
    crop and flip exactly as one process augmenting the global batch."""
    x = numpy.random.default_rng(0).standard_normal((12, 2, 6, 5)).astype(numpy.float32)
    one = gpucnn.Augment(padding=2, flip=True, seed=7)
    ranks = [gpucnn.Augment(padding=2, flip=True, seed=7, rank=r, ranks=3) for r in range(3)]
    for _ in range(3):  # the counters advance alike
        whole = one(x)
        for r, aug in enumerate(ranks):
            numpy.testing.assert_array_equal(aug(x[r::3]), whole[r::3])
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\] for 3 ranks, got 3"):
        gpucnn.Augment(padding=2, rank=3, ranks=3)


def test_ranks_drop_their_rows_of_the_global_batchs_masks():
    """R ranks' Dropout (same seed, set_share) drop exactly what one process drops on
    the global batch, rows r, r + R, ...; without set_share every rank would draw the
    same mask, and the unshared layer keeps its single-process draws."""
    x = numpy.random.default_rng(0).standard_normal((12, 3, 4)) + 5.0
    one = nn.Dropout(0.5)
    ranks = [nn.Dropout(0.5) for _ in range(3)]
    for r, layer in enumerate(ranks):
        layer.set_rng_state(one.get_rng_state())
        layer.set_share(r, 3)
    for _ in range(3):  # the counters advance alike
        whole = one.forward(x)
        parts = [layer.forward(x[r::3]) for r, layer in enumerate(ranks)]
        for r, part in enumerate(parts):
            numpy.testing.assert_array_equal(part, whole[r::3])
        assert not numpy.array_equal(parts[0] == 0, parts[1] == 0)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\] for 3 ranks, got 3"):
        nn.Dropout().set_share(3, 3)


def test_a_closed_or_dropped_reducer_hooks_nothing():
    """close() removes the reducer's hooks; one dropped without close() is freed (the
    model holds its hooks weakly) and its hooks run nothing."""
    calls = []

    class Counting(dist.GradientReducer):
        def _module_done(self, module):
            calls.append(module)
            super()._module_done(module)

    x, y = cases.data()
    model = cases.lenet()
    reducer = Counting(model, dist.LocalCommunicator())
    cases.train(model, x, y, cases.batches(0, 1, 8, 1), reducer)
    assert len(calls) == 3  # the two convs and the Linear
    reducer.close()
    cases.train(model, x, y, cases.batches(0, 1, 8, 1))
    assert len(calls) == 3
    dropped = weakref.ref(Counting(model, dist.LocalCommunicator()))
    gc.collect()
    assert dropped() is None
    cases.train(model, x, y, cases.batches(0, 1, 8, 1))
    assert len(calls) == 3


def test_ranks_pick_their_gpu_through_the_backends_cupy(standin, monkeypatch):
    """gpu_count and use_gpu go through the module playing CuPy (the stand-in here),
    as the rest of the backend does; an index past the count is an error."""
    from gpucnn import backend
    from gpucnn.errors import DeviceError
    monkeypatch.setenv("STANDIN_GPUS", "2")
    monkeypatch.setattr(standin.Device, "current", 0)
    assert backend.gpu_count() == 2
    backend.use_gpu(dist.World(local_rank=3, local_size=4).device_index(backend.gpu_count()))
    assert standin.cuda.runtime.getDevice() == 1
    with pytest.raises(DeviceError, match=r"GPU index must be in \[0, 2\), got 2"):
        backend.use_gpu(2)
