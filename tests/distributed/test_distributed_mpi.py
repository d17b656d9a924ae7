"""Data-parallel training on real MPI ranks: tests/distributed/mpi_cases.py run under
``mpiexec -n 2`` (and ``-n 3``), its results compared here with one process.

Needs an MPI launcher and mpi4py built for it (CI: python -m pip install mpich mpi4py).
Where they are missing the tests are skipped with the reason, except under CI
(CI=true), where that is a failure: these tests must run there.
"""
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import mpi_cases as cases
import numpy
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(HERE, "mpi_cases.py")
TWO_RANK_CASES = ["host", "equivalence64", "equivalence32", "buckets", "syncbn_functional",
                  "syncbn_training", "broadcast", "average", "nccl"]
# after 20 SGD steps (momentum 0.9) of 2 ranks x batch 4 against one process x batch 8,
# relative to each array's largest value: the sums run in another order, nothing more
# (measured: 4e-16 and 3e-15 in float64, 2e-7 in float32)
TOLERANCE = {numpy.float64: 1e-12, numpy.float32: 2e-5}


@functools.cache
def _launcher():
    """[mpiexec, its options] for this Python's mpi4py, or None with the reason why not."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None or importlib.util.find_spec("mpi4py") is None:
        found = {"mpiexec": mpiexec, "mpi4py": importlib.util.find_spec("mpi4py")}
        missing = " and ".join(name for name, ok in found.items() if not ok)
        return None, f"{missing} not installed (python -m pip install mpich mpi4py)"
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             check=False).stdout
    options = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else []
    return [mpiexec] + options, None


def _need_mpi():
    command, why = _launcher()
    if command is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the distributed tests must run in CI: {why}")
        pytest.skip(why)
    return command


def launch(out, ranks, names, timeout=240, test_timeout=60):
    """Run the cases on `ranks` MPI ranks, results in out; the CompletedProcess."""
    path = os.pathsep.join([ROOT, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", GPUCNN_TEST_TIMEOUT=str(test_timeout),
               PYTHONPATH=path.rstrip(os.pathsep))
    env.pop("GPUCNN_TEST_STANDIN", None)
    os.makedirs(out, exist_ok=True)
    return subprocess.run(_need_mpi() + ["-n", str(ranks), sys.executable, SCRIPT, str(out)]
                          + list(names), capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def results(out, name, ranks):
    """[rank 0's arrays, rank 1's, ...] of one case; fails with a rank's traceback."""
    found = []
    for r in range(ranks):
        base = os.path.join(out, f"{name}.rank{r}")
        if os.path.exists(base + ".error"):
            with open(base + ".error") as f:
                pytest.fail(f"case {name} raised on rank {r}:\n" + f.read())
        if not os.path.exists(base + ".npz"):
            pytest.fail(f"case {name} left no result on rank {r} (the run ended before it)")
        with numpy.load(base + ".npz") as z:
            found.append({k: z[k] for k in z.files})
    return found


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    run = launch(out, 2, TWO_RANK_CASES)
    assert run.returncode == 0, f"mpiexec -n 2 failed ({run.returncode}):\n{run.stderr[-3000:]}"
    return lambda name: results(out, name, 2)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    out = tmp_path_factory.mktemp("three_ranks")
    run = launch(out, 3, ["uneven", "average3"])
    assert run.returncode == 0, f"mpiexec -n 3 failed ({run.returncode}):\n{run.stderr[-3000:]}"
    return lambda name: results(out, name, 3)


def _states(result):
    return {k[len("state."):]: v for k, v in result.items() if k.startswith("state.")}


def assert_same_bits_on_every_rank(ranks):
    for r, other in enumerate(ranks[1:], 1):
        for k, v in _states(ranks[0]).items():
            assert numpy.array_equal(v, _states(other)[k]), f"{k} differs on rank {r}"


def assert_close_to(state, reference, dtype):
    for k, v in reference.items():
        err = numpy.max(numpy.abs(state[k] - v)) / max(numpy.max(numpy.abs(v)), 1e-300)
        assert err <= TOLERANCE[dtype], f"{k}: relative error {err:.2e} > {TOLERANCE[dtype]}"


def test_host_collectives(two):
    for r, got in enumerate(two("host")):
        assert got["sum_int"] == 3 and got["max_float"] == 0.5 and got["bcast"] == 1
        assert list(got["min_array"]) == [0, -1] and list(got["gathered"]) == [0, 1]
        assert list(got["differing"]) == [1, -1], "rank 1's value differs from rank 0's"
        assert got["agreed"] == 6, "agree_later: the max of 5 and 6"
        assert list(got["local"]) == [r, 2, 0], "both ranks on this node; 1 GPU -> device 0"


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_two_ranks_equal_one_process_with_the_global_batch(two, dtype):
    """2 ranks x batch 4, gradients averaged by the reducer, starting from rank 0's
    broadcast weights (each rank drew its own), equal one process x batch 8 after 20
    steps; every rank holds the same bits."""
    ranks = two("equivalence64" if dtype == numpy.float64 else "equivalence32")
    assert_same_bits_on_every_rank(ranks)
    state, losses = cases.reference(lambda: cases.lenet(dtype=dtype), 2, dtype=dtype)
    assert_close_to(_states(ranks[0]), state, dtype)
    mean_loss = (ranks[0]["losses"] + ranks[1]["losses"]) / 2
    numpy.testing.assert_allclose(mean_loss, losses, rtol=TOLERANCE[dtype] * 10)
    assert int(ranks[0]["started_in_backward"]) == int(ranks[0]["steps"]) == 20


def test_many_small_buckets_give_the_same_bits(two):
    """bucket_bytes=200: many buckets, in reverse parameter order, each started during
    backward; the sums are elementwise, so the result is the one-bucket run's bits."""
    many, one = two("buckets"), two("equivalence64")
    assert len(many[0]["buckets"]) >= 4 and len(one[0]["buckets"]) == 1
    order = list(many[0]["order"])
    assert order == ["6.bias", "6.weight", "3.bias", "3.weight", "0.bias", "0.weight"]
    assert int(many[0]["started_in_backward"]) >= 20 * (len(many[0]["buckets"]) - 1)
    for k, v in _states(one[0]).items():
        assert numpy.array_equal(_states(many[0])[k], v), k


def test_sync_batchnorm_functional_equals_one_batch_norm(two):
    """batch_norm(sync=) on rows 0:2 and 2:6 of a batch equals batch_norm over all 6
    rows: y and dx row for row, the running statistics on both ranks, and the ranks'
    dweight and dbias adding up to the whole batch's."""
    import gpucnn.functional as F
    x, dy, rows = cases.syncbn_data()
    rm, rv = numpy.full(3, 0.5), numpy.full(3, 2.0)
    w, b = numpy.array([1.5, -0.5, 2.0]), numpy.array([0.1, 0.2, -0.3])
    y, saved = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    dx, dw, db = F.batch_norm_backward(dy, saved, w)
    ranks = two("syncbn_functional")
    for part, got in zip(rows, ranks):
        numpy.testing.assert_allclose(got["y"], y[part], rtol=1e-13, atol=1e-13)
        numpy.testing.assert_allclose(got["dx"], dx[part], rtol=1e-12, atol=1e-13)
        numpy.testing.assert_allclose(got["rm"], rm, rtol=1e-14)
        numpy.testing.assert_allclose(got["rv"], rv, rtol=1e-14)
    numpy.testing.assert_allclose(ranks[0]["dw"] + ranks[1]["dw"], dw, rtol=1e-12)
    numpy.testing.assert_allclose(ranks[0]["db"] + ranks[1]["db"], db, rtol=1e-12)


def test_sync_batchnorm_training_equals_one_process(two):
    """With convert_sync_batchnorm, 2 ranks x 4 equal one process x 8 with BatchNorm2D,
    running statistics included, after 20 steps."""
    ranks = two("syncbn_training")
    assert_same_bits_on_every_rank(ranks)
    state, _ = cases.reference(lambda: cases.lenet(bn=True), 2)
    assert_close_to(_states(ranks[0]), state, numpy.float64)


def test_broadcast_state_gives_every_rank_rank0s_model(two):
    r0, r1 = two("broadcast")
    assert r0["before"] != r1["before"], "the ranks started from different states"
    assert r0["after"] == r1["after"] == r0["before"]
    assert_same_bits_on_every_rank([r0, r1])


def test_average_buffers(two):
    """Running statistics that differ become their mean, sum / 2 in float32, on both
    ranks; ones equal everywhere and the integer batch counts stay as they were."""
    r0, r1 = two("average")
    for k in r0:
        if not k.startswith("after."):
            continue
        name = k[len("after."):]
        a, b = r0["before." + name], r1["before." + name]
        assert numpy.array_equal(r0[k], r1[k]), name
        want = a if a.dtype.kind != "f" or numpy.array_equal(a, b) else (a + b) / a.dtype.type(2)
        assert numpy.array_equal(r0[k], want), name
    assert not numpy.array_equal(r0["before.5.running_var"], r1["before.5.running_var"])
    assert numpy.all(r0["after.1.running_mean"] == numpy.float32(0.25))


def test_nccl_path_on_the_standins(two):
    """The GPU path: NcclCommunicator (through the stand-ins of CuPy and NCCL), rank 0's
    weights broadcast by NCCL, sync-BN and bucketed all-reduces on the communicator's
    own stream, no device->host sync inside a step; the same training as one process
    on the CPU with the global batch."""
    ranks = two("nccl")
    assert str(ranks[0]["kind"]) == "NcclCommunicator"
    for got in ranks:
        assert got["syncs"].tolist() == [0] * 6
        assert bool(got["allreduce_streams_nonnull"])
        calls = got["calls"].tolist()
        n_state = len(_states(got))
        assert calls[:n_state] == ["broadcast"] * n_state
        # per step: 2 sync-BN sums forward, 1 backward, then one per bucket
        assert calls[n_state:] == ["allReduce"] * (6 * (3 + int(got["buckets"])))
    assert int(ranks[0]["buckets"]) >= 2
    assert_same_bits_on_every_rank(ranks)
    x, y = cases.data()
    model = cases.mlp()
    cases.train(model, x, y, cases.batches(0, 1, 2 * cases.BATCH, 6))
    assert_close_to(_states(ranks[0]), cases._state(model), numpy.float64)


def test_same_seed_same_ranks_same_bits(two, tmp_path):
    """A second run of the same training on 2 ranks gives the same bits."""
    run = launch(tmp_path, 2, ["equivalence64", "syncbn_training"])
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("equivalence64", "syncbn_training"):
        again, first = results(tmp_path, name, 2), two(name)
        for r in range(2):
            for k, v in first[r].items():
                assert numpy.array_equal(again[r][k], v), f"{name} rank {r}: {k}"


def test_three_ranks_uneven_shards(three):
    """3 ranks: training shards disjoint and of equal length (20 samples, global batch 6:
    18 used, 2 dropped); the evaluation of 10 samples split 4, 3, 3 and the correct
    counts and loss sums adding up to one process's; 3 steps of training equal one
    process with batch 6."""
    import gpucnn.functional as F
    ranks = three("uneven")
    order = numpy.random.default_rng(1).permutation(20)
    shards = [r["shard"] for r in ranks]
    assert [len(s) for s in shards] == [6, 6, 6]
    assert sorted(numpy.concatenate(shards)) == sorted(order[:18])
    assert [tuple(r["part"]) for r in ranks] == [(0, 4), (4, 7), (7, 10)]
    x, y = cases.data(n=10, seed=9)
    logits = cases.lenet(seed=100).eval().forward(x)
    loss, _ = F.softmax_cross_entropy(logits, y)
    for r in ranks:
        assert int(r["correct"]) == int((logits.argmax(axis=1) == y).sum())
        numpy.testing.assert_allclose(float(r["loss_sum"]), float(loss) * 10, rtol=1e-12)
    assert_same_bits_on_every_rank(ranks)
    xt, yt = cases.data()
    model = cases.lenet(seed=100)
    cases.train(model, xt, yt, cases.batches(0, 1, 6, 3))
    assert_close_to(_states(ranks[0]), cases._state(model), numpy.float64)


def test_average_of_three_ranks(three):
    """Equal values stay bit for bit (3 x 0.1 / 3 would not); unequal ones become
    their mean, the same on every rank."""
    ranks = three("average3")
    for r in ranks:
        assert numpy.all(r["mean"] == 0.1)
        assert numpy.array_equal(r["var"], ranks[0]["var"])
    numpy.testing.assert_allclose(ranks[0]["var"], (0.1 + 1.1 + 2.1) / 3, rtol=1e-15)


@pytest.mark.parametrize("silent, waiting", [(1, 0), (0, 1)])
def test_a_rank_that_stops_answering_ends_the_world_naming_it(tmp_path, silent, waiting):
    """With a 1 s timeout, the rank that waits in a collective ends the run within a
    few seconds, with one line naming the rank that does not answer."""
    t0 = time.monotonic()
    run = launch(tmp_path, 2, [f"timeout_rank{silent}"], timeout=60)
    elapsed = time.monotonic() - t0
    ours = [line for line in run.stderr.splitlines() if line.startswith("gpucnn:")]
    said = f"after {elapsed:.1f} s, exit status {run.returncode}, stderr:\n{run.stderr}"
    assert run.returncode != 0 and elapsed < 20, said
    assert len(ours) == 1, said
    assert f"rank {silent} did not answer within 1 s" in ours[0], said
    assert f"rank {waiting} waiting in" in ours[0], said


def test_a_busy_rank_is_named_busy_not_silent(tmp_path):
    """Rank 0 writing files inside world.busy past rank 1's deadline: the one line
    says where rank 0 is, and does not blame it for not answering."""
    t0 = time.monotonic()
    run = launch(tmp_path, 2, ["busy_rank0"], timeout=60)
    elapsed = time.monotonic() - t0
    ours = [line for line in run.stderr.splitlines() if line.startswith("gpucnn:")]
    said = f"after {elapsed:.1f} s, exit status {run.returncode}, stderr:\n{run.stderr}"
    assert run.returncode != 0 and elapsed < 20 and len(ours) == 1, said
    assert "did not answer" not in ours[0], said
    assert "rank 1 waiting in allreduce_host(sum)" in ours[0], said
    assert "rank 0 is in writing the checkpoint" in ours[0], said
