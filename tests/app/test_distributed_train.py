"""`mpiexec -n R gpucnn train` end to end: real MPI ranks as subprocesses, on the CPU,
on the bundled digits (one BLAS thread per rank). What rank 0 alone writes and
prints, the sums that count every test image once, the same bits run after run,
uneven shards, stops on a signal, a killed and a hung rank, a mismatch between the
ranks, sync-BN, and a resume on another number of ranks."""
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy
import pytest

from gpucnn.app import checkpoint, cli, train

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _mpiexec():
    """The mpiexec beside this Python (a virtual environment's, from the mpich wheel),
    else the one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = pytest.mark.skipif(
    MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
    reason="needs an MPI launcher (mpiexec) and mpi4py: pip install mpi4py mpich "
           "(CI installs both)")

# Each rank runs this: it notes its pid (to signal one rank) and appends the
# arguments of $EXTRA_ARGS_RANK<r> (to make one rank differ), then is gpucnn; with
# $STANDIN set, on the CuPy and NCCL stand-ins (tests/standin) as its GPU.
RANK = """
import os, sys
rank = next((os.environ[v] for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
             if v in os.environ), "0")
if os.environ.get("PIDS"):
    with open(os.path.join(os.environ["PIDS"], "rank" + rank), "w") as f:
        f.write(str(os.getpid()))
if os.environ.get("STANDIN"):
    import standin, gpucnn, gpucnn.backend, gpucnn.distributed
    from standin import nccl
    gpucnn.backend.set_cupy_module(standin)
    gpucnn.distributed.set_nccl_module(nccl)
    gpucnn.set_conv_precision("fp32")  # as every test in this process (tests/conftest.py)
from gpucnn.app.cli import main
rc = main(sys.argv[1:] + os.environ.get("EXTRA_ARGS_RANK" + rank, "").split())
if os.environ.get("STANDIN"):  # the NCCL collectives this rank made
    with open(os.path.join(os.environ["PIDS"], "nccl" + rank), "w") as f:
        f.write(" ".join(c[0] for c in nccl.calls))
sys.exit(rc)
"""
QUICK = ["--limit", "256", "--no-progress", "--device", "cpu"]


@pytest.fixture
def ranks(tmp_path):
    """ranks(n, *args, wait=True, **env): `mpiexec -n n` of gpucnn with args; the
    CompletedProcess (stdout and stderr as text), or with wait=False the Popen."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    pids = tmp_path / "pids"
    pids.mkdir()
    started = []

    def run(n, *args, wait=True, timeout=120, **env):
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("PMI_", "OMPI_", "PMIX_", "GPUCNN_MPI"))}
        environ.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                       PIDS=str(pids), **env)
        command = [MPIEXEC, "-n", str(n), sys.executable, str(script)] + [str(a) for a in args]
        if wait:
            return subprocess.run(command, capture_output=True, text=True, env=environ,
                                  timeout=timeout, cwd=tmp_path, check=False)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=environ, cwd=tmp_path)
        started.append(proc)
        return proc

    run.pid = lambda rank: int((pids / f"rank{rank}").read_text())
    run.stopped = []
    run.nccl_calls = lambda rank: (pids / f"nccl{rank}").read_text().split()
    yield run
    for proc in started:  # a test that failed early: mpiexec passes SIGTERM to the ranks
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    for pid in run.stopped:  # a rank stopped with SIGSTOP must not outlive the test
        try:
            if "\nState:\tT" in pathlib.Path(f"/proc/{pid}/status").read_text():
                os.kill(pid, signal.SIGKILL)
        except OSError:  # gone: the launcher ended it
            pass


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait_for_rows(out, proc, n=1, limit=60):
    """Until metrics.jsonl has n rows (the run is past its first checkpoint)."""
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(_rows(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} epoch(s) in {limit} s: {proc.communicate()}")


def _arrays(path):
    _, model_state, optim = checkpoint.read(path)
    return {**{f"model/{k}": v for k, v in model_state.items()},
            **{f"optim/{k}": v for k, v in optim.items()}}


def _assert_same_bits(a, b):
    a, b = _arrays(a), _arrays(b)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and numpy.array_equal(a[k], b[k]), k


def _quiet(*args):
    return None


def test_two_ranks_train_like_one_process_of_the_global_batch(tmp_path, ranks):
    out = tmp_path / "run"
    done = ranks(2, "train", "--epochs", "2", "--out", out, *QUICK)
    assert done.returncode == 0, done.stderr
    printed = done.stdout
    # rank 0 alone prints: each line once
    assert printed.count("gpucnn: training on cpu") == 1
    assert printed.count("epoch 2/2: train loss") == 1 and printed.count("gpucnn: done") == 1
    assert ("gpucnn: 2 ranks, each on cpu: batch 32 per rank, a global batch of 64 per step "
            "(--lr 0.002 is used as given, not scaled for it); 4 steps per epoch\n") in printed
    assert "error" not in done.stderr
    # rank 0 alone writes: the run's files, no temporary or second file
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "confusion.png",
                                                     "curves.png", "metrics.jsonl"]
    meta = checkpoint.read(out / "checkpoint.npz")[0]
    assert (meta["world_size"], meta["global_batch"], meta["config"]["batch_size"]) == (2, 64, 32)
    assert [r["epoch"] for r in _rows(out)] == [1, 2]
    # the ranks' sums count every test image once: one process recounts the same
    recount = train.evaluate_checkpoint(out / "checkpoint.npz", log=_quiet)
    assert recount["test_accuracy"] == _rows(out)[-1]["test_accuracy"]
    assert recount["test_loss"] == pytest.approx(_rows(out)[-1]["test_loss"], rel=1e-6)
    # 2 ranks of 32 take the steps of one process of 64, within float rounding
    train.train(train.Config(epochs=2, limit=256, batch_size=64, device="cpu", progress=False,
                             out=str(tmp_path / "one")), log=_quiet)
    one, two = _arrays(tmp_path / "one/checkpoint.npz"), _arrays(out / "checkpoint.npz")
    for k in one:
        numpy.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_same_seed_and_ranks_give_the_same_bits(tmp_path, ranks):
    # a ResNet: BatchNorm's statistics averaged across the ranks, augmentation
    args = ["train", "--model", "resnet", "--batch-size", "16", "--limit", "128", "--epochs", "1",
            "--no-progress", "--device", "cpu"]
    for name in ("a", "b"):
        done = ranks(2, *args, "--out", tmp_path / name)
        assert done.returncode == 0, done.stderr
    _assert_same_bits(tmp_path / "a/checkpoint.npz", tmp_path / "b/checkpoint.npz")
    untimed = [[{k: v for k, v in row.items() if k not in ("images_per_s", "elapsed_s")}
                for row in _rows(tmp_path / name)] for name in ("a", "b")]
    assert untimed[0] == untimed[1]


def test_three_ranks_share_uneven_data(tmp_path, ranks):
    out = tmp_path / "run"
    done = ranks(3, "train", "--epochs", "1", "--out", out, "--limit", "250", "--no-progress",
                 "--device", "cpu")
    assert done.returncode == 0, done.stderr
    # 250 = 2 steps x 3 ranks x 32 + 58 left out; the 359 test images split 120/120/119
    assert ("a global batch of 96 per step (--lr 0.002 is used as given, not scaled for it); "
            "2 steps per epoch, the 58 training images that fill no global batch left out "
            "(another set each epoch)") in done.stdout
    recount = train.evaluate_checkpoint(out / "checkpoint.npz", log=_quiet)
    assert recount["test_accuracy"] == _rows(out)[-1]["test_accuracy"]


def test_sigterm_to_one_rank_stops_all_after_one_step_and_resume_is_exact(tmp_path, ranks):
    out = tmp_path / "cut"
    proc = ranks(2, "train", "--epochs", "500", "--out", out, *QUICK, wait=False)
    _wait_for_rows(out, proc)
    os.kill(ranks.pid(1), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stdout.count("gpucnn: interrupted") == 1, stdout  # rank 0's one line
    meta = checkpoint.read(out / "checkpoint.npz")[0]
    epochs = meta["epoch"] + 1  # the one it stopped in, or the next where it stopped between
    done = ranks(2, "train", "--resume", out / "checkpoint.npz", "--epochs", epochs, *QUICK)
    assert done.returncode == 0, done.stderr
    assert [r["epoch"] for r in _rows(out)] == list(range(1, epochs + 1))
    straight = ranks(2, "train", "--epochs", epochs, "--out", tmp_path / "straight", *QUICK)
    assert straight.returncode == 0, straight.stderr
    # both ranks stopped after the same step: the resumed run has the straight run's bits
    _assert_same_bits(out / "checkpoint.npz", tmp_path / "straight/checkpoint.npz")


def test_sigterm_twice_to_mpiexec_saves_once_and_resume_is_exact(tmp_path, ranks):
    # mpiexec forwards each SIGTERM to every rank: two requests milliseconds apart on
    # each rank are one stop, answered with one checkpoint, not an abort saving nothing
    out = tmp_path / "cut"
    proc = ranks(2, "train", "--epochs", "500", "--out", out, *QUICK, wait=False)
    _wait_for_rows(out, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    # rank 0's one line, one save; a repeat landing after it did not kill a rank (status 15)
    assert stdout.count("gpucnn: interrupted") == 1 and stdout.count("saved") == 1, stdout
    assert "every rank ends now" not in stderr and "saving nothing" not in stderr, stderr
    names = {p.name for p in out.iterdir()}  # no second or temporary checkpoint
    assert {"checkpoint.npz", "metrics.jsonl"} <= names <= {"checkpoint.npz", "metrics.jsonl",
                                                          "confusion.png", "curves.png"}, names
    epochs = checkpoint.read(out / "checkpoint.npz")[0]["epoch"] + 1
    done = ranks(2, "train", "--resume", out / "checkpoint.npz", "--epochs", epochs, *QUICK)
    assert done.returncode == 0, done.stderr
    straight = ranks(2, "train", "--epochs", epochs, "--out", tmp_path / "straight", *QUICK)
    assert straight.returncode == 0, straight.stderr
    _assert_same_bits(out / "checkpoint.npz", tmp_path / "straight/checkpoint.npz")


def test_kill_9_of_one_rank_keeps_the_checkpoint_and_a_resume_on_3_ranks_finishes(tmp_path,
                                                                                  ranks):
    out = tmp_path / "run"
    proc = ranks(2, "train", "--epochs", "500", "--out", out, "--dist-timeout", "20", *QUICK,
                 wait=False)
    _wait_for_rows(out, proc)
    killed = time.monotonic()
    os.kill(ranks.pid(1), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.monotonic() - killed < 40
    # the launcher ends the others at once and names the dead process (MPICH: its exit
    # code 9, Open MPI: "rank 1 ... signal 9"); gpucnn's timeout would name rank 1
    assert any(s in stdout + stderr for s in ("rank 1", "signal 9", "EXIT CODE: 9")), (stdout,
                                                                                    stderr)
    meta = checkpoint.read(out / "checkpoint.npz")[0]  # whole: written atomically
    epochs = meta["epoch"] + 1
    done = ranks(3, "train", "--resume", out / "checkpoint.npz", "--epochs", epochs, *QUICK)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(
        f"{out / 'checkpoint.npz'} was trained on 2 ranks (a global batch of 64) and resumes on "
        "3 ranks (a global batch of 96): the order of the data changes from here on, and the "
        "learning rate stays as it was") == 1
    assert [r["epoch"] for r in _rows(out)] == list(range(1, epochs + 1))
    assert checkpoint.read(out / "checkpoint.npz")[0]["world_size"] == 3


def test_a_rank_that_stops_answering_ends_the_run_within_the_timeout(tmp_path, ranks):
    out = tmp_path / "run"
    proc = ranks(2, "train", "--epochs", "500", "--out", out, "--dist-timeout", "3", *QUICK,
                 wait=False)
    _wait_for_rows(out, proc)
    stopped = time.monotonic()
    ranks.stopped.append(ranks.pid(1))
    os.kill(ranks.pid(1), signal.SIGSTOP)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.monotonic() - stopped < 30
    assert stderr.count("gpucnn: rank 1 did not answer within 3 s") == 1, stderr
    assert checkpoint.read(out / "checkpoint.npz")[0]["epoch"] >= 1


def test_ranks_that_differ_or_share_a_mistake_are_told_once(tmp_path, ranks):
    out = tmp_path / "run"
    done = ranks(2, "train", "--epochs", "1", "--out", out, *QUICK, EXTRA_ARGS_RANK1="--lr 0.5")
    assert done.returncode == 2
    line = ("gpucnn: error: the ranks do not run the same --lr: rank 0 has 0.002, rank 1 has "
            "0.5; start every rank with the same command, data and gpucnn\n")
    assert done.stderr.count("gpucnn: error") == 1 and line in done.stderr, done.stderr
    assert not out.exists()  # the folder rank 0 made for the run is gone again
    done = ranks(2, "train", "--epochs", "0", "--out", out, *QUICK)
    assert done.returncode == 2
    assert done.stderr == "gpucnn: error: epochs must be a positive int, got 0\n"


def test_sync_bn_normalises_with_the_global_batch(tmp_path, ranks):
    # the recipe's crop+flip too: each rank applies its share of the global batch's draws
    args = ["--model", "resnet", "--limit", "128", "--epochs", "1"]
    done = ranks(2, "train", *args, "--batch-size", "16", "--sync-bn", "--out", tmp_path / "two",
                 "--no-progress", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert checkpoint.read(tmp_path / "two/checkpoint.npz")[0]["config"]["sync_bn"] is True
    train.train(train.Config(model="resnet", limit=128, epochs=1, batch_size=32,
                             device="cpu", progress=False, out=str(tmp_path / "one")), log=_quiet)
    one, two = _arrays(tmp_path / "one/checkpoint.npz"), _arrays(tmp_path / "two/checkpoint.npz")
    for k in one:  # weights, momentum and running statistics
        numpy.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_bench_distributed_times_the_ranks_against_one_process(ranks, capsys):
    done = ranks(2, "bench", "--distributed", "--device", "cpu", "--smoke", "--repeat", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("gpucnn bench --distributed: 2 ranks") == 1
    header, row = done.stdout.splitlines()[1:3]
    assert header.split() == ["model", "batch", "step", "compute", "wait", "share", "all-reduce",
                              "overlap", "buckets", "1", "process", "ratio"]
    assert row.split()[:4] == ["lenet", "4", "x", "2"] and float(row.split()[-1]) > 0
    assert cli.main(["bench", "--distributed", "--device", "cpu"]) == 2
    assert "start it with the MPI launcher" in capsys.readouterr().err


def test_info_names_the_mpi_library_and_the_world(capsys):
    cli._report_distributed()
    printed = capsys.readouterr().out
    assert "MPI: " in printed and "(mpi4py " in printed
    assert "world: 1 rank (not started by mpiexec or srun)" in printed and "NCCL: " in printed
    # a plain process reads the library's version without starting MPI
    code = ("from gpucnn.app import cli; cli._report_distributed(); "
            "from mpi4py import MPI; print('initialized', MPI.Is_initialized())")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_"))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=60, check=False)
    assert done.returncode == 0 and "MPI: " in done.stdout, done.stderr
    assert "initialized False" in done.stdout, done.stdout


def test_ranks_on_the_gpu_path_sum_with_nccl_standin(tmp_path, ranks, standin):
    """The GPU path (NCCL through CuPy, the step's graph wrapper) on the stand-ins: two
    ranks of 16 train like one stand-in process of 32, within float rounding."""
    args = ["--limit", "64", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.1",
            "--no-progress", "--device", "cuda"]
    done = ranks(2, "train", *args, "--batch-size", "16", "--out", tmp_path / "two",
                 STANDIN="1", STANDIN_GPUS="2")
    assert done.returncode == 0, done.stderr
    assert "training on cuda" in done.stdout and done.stdout.count("gpucnn: done") == 1
    # each rank: the 8 parameters broadcast from rank 0, one bucket all-reduced per step
    for rank in (0, 1):
        assert ranks.nccl_calls(rank) == ["broadcast"] * 8 + ["allReduce"] * 2
    train.train(train.Config(limit=64, epochs=1, optimizer="sgd", lr=0.1, batch_size=32,
                             device="cuda", progress=False, out=str(tmp_path / "one")),
                log=_quiet)
    one, two = _arrays(tmp_path / "one/checkpoint.npz"), _arrays(tmp_path / "two/checkpoint.npz")
    for k in one:
        numpy.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_more_ranks_than_gpus_on_a_node_is_one_error_line(tmp_path, ranks):
    # two ranks would share the stand-in's one GPU, which NCCL refuses on every rank
    done = ranks(2, "train", "--limit", "64", "--epochs", "1", "--no-progress", "--device",
                 "cuda", "--out", tmp_path / "run", STANDIN="1")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "gpucnn: error: 2 ranks run on this node but it has 1 GPU, and NCCL cannot put two "
        "ranks on one GPU; start at most 1 rank per node (mpiexec -n, Slurm's "
        "--ntasks-per-node) or train with --device cpu\n"), done.stderr
    assert ranks.nccl_calls(0) == [] and not (tmp_path / "run").exists()


def test_a_stop_agreed_while_a_rank_diverged_saves_nothing():
    """The ranks agreed on a signal after step k, and rank 1 found a NaN at step k+1:
    the interrupted save is skipped (the model is NaN; the last good checkpoint
    stays) and every rank raises the NaN line instead; without a NaN it saves."""
    saved = []

    class World:
        def __init__(self, theirs):
            self.theirs = theirs

        def allgather_host(self, mine):
            return [mine, mine[:4] + (self.theirs,)]

    def run_for(theirs):
        team = types.SimpleNamespace(world=World(theirs), is_root=True,
                                     outcome=lambda work: work())
        return types.SimpleNamespace(
            team=team, config=types.SimpleNamespace(sync_bn=True), log=_quiet,
            ckpt_path="ckpt", save=lambda *args: saved.append(args))

    interrupts = types.SimpleNamespace(cut_short=False)
    e = train._Epoch(0, 3, loss_sum=1.0, correct=2, seen=8)
    with pytest.raises(train.TrainingDiverged, match="loss is nan on rank 1"):
        train._save_interrupted(run_for("loss is nan on rank 1"), e, None, interrupts)
    assert saved == []
    train._save_interrupted(run_for(None), e, None, interrupts)
    assert len(saved) == 1 and saved[0][3]["seen"] == 16
