"""Run folders, metrics that match the checkpoint, resume of finished runs,
interrupts (SIGTERM, Ctrl-C during evaluation or plotting), full disks and BLAS
threads: a run never loses or mixes work."""
import json
import os
import signal
import subprocess
import sys

import numpy
import pytest

import gpucnn
from gpucnn.app import checkpoint, models, runs, train
from gpucnn.backends.cpu import threads as threads_module
from gpucnn.app.cli import main
from gpucnn.errors import UserError
from gpucnn.nn import Module, Sequential

QUICK = dict(dataset="digits", limit=96, batch_size=32, progress=False)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def quiet(*a):
    pass


def _epochs(out):
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text()
            .splitlines()]


def _weights(path):
    return checkpoint.read(path)[1]


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(numpy.array_equal(wa[k], wb[k]) for k in wa)


def test_default_folders_are_unique_and_the_last_line_names_the_one_used(tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default is runs/<date-time> under the working directory
    for _ in range(3):  # the same second, most likely: each gets its own folder
        assert main(["train", "--limit", "64", "--epochs", "1", "--no-progress"]) == 0
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 3
    printed = capsys.readouterr().out
    last_lines = [line for line in printed.splitlines() if line.startswith("gpucnn: done")]
    for line, folder in zip(last_lines, folders):
        assert line.endswith(os.path.join("runs", folder))
    # from Python too, with no out: a new folder, never runs/latest
    train.train(train.Config(epochs=1, **QUICK), log=quiet)
    assert len(list((tmp_path / "runs").iterdir())) == 4
    assert not (tmp_path / "runs" / "latest").exists()


def test_an_out_that_holds_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "same"
    base = ["train", "--limit", "64", "--no-progress", "--out", str(out)]
    assert main(base + ["--epochs", "2"]) == 0
    before = (out / "checkpoint.npz").read_bytes()
    capsys.readouterr()
    assert main(base + ["--epochs", "3", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run" in err
    assert f"--resume {out / 'checkpoint.npz'}" in err and "--overwrite" in err
    assert (out / "checkpoint.npz").read_bytes() == before and _epochs(out) == [1, 2]
    (out / "notes.txt").write_text("mine")
    assert main(base + ["--epochs", "1", "--seed", "1", "--overwrite"]) == 0
    assert _epochs(out) == [1] and checkpoint.read(out / "checkpoint.npz")[0]["config"][
        "seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only run files
    # the same rule from Python
    with pytest.raises(UserError, match="already holds a run"):
        train.train(train.Config(epochs=1, out=str(out), **QUICK), log=quiet)


def test_a_live_run_locks_its_folder(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with runs.FolderLock(out):
        with pytest.raises(UserError, match=rf"another gpucnn run \(pid {os.getpid()}\) is "
                                            rf"writing to {out}"):
            train.train(train.Config(epochs=1, out=str(out), **QUICK), log=quiet)
        assert not (out / "checkpoint.npz").exists()
    train.train(train.Config(epochs=1, out=str(out), **QUICK), log=quiet)  # free again
    assert not (out / runs.LOCK).exists()


def test_a_killed_runs_lock_does_not_block(tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    code = ("import sys, os; sys.path.insert(0, sys.argv[1]); from gpucnn.app import runs; "
            "runs.FolderLock(sys.argv[2]).acquire(); os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code, ROOT, str(out)])
    assert (out / runs.LOCK).exists()
    train.train(train.Config(epochs=1, out=str(out), **QUICK), log=quiet)


def test_metrics_are_rebuilt_from_the_checkpoint_and_stale_temporaries_removed(tmp_path):
    out = tmp_path / "run"
    train.train(train.Config(epochs=2, out=str(out), **QUICK), log=quiet)
    # a kill between the checkpoint and the metrics: the file lags behind (a gap),
    # or an old process wrote a row twice (a duplicate); and a save was cut short
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(rows[0] + "\n" + rows[0] + "\n")
    (out / "checkpoint.npz.tmp-999999").write_bytes(b"x" * 1000)
    (out / "metrics.jsonl.tmp-999999").write_text("{")
    for name in runs.PLOTS:
        (out / name).unlink()
    train.train(train.Config(epochs=3, resume=str(out / "checkpoint.npz"), **QUICK), log=quiet)
    assert _epochs(out) == [1, 2, 3]
    assert not list(out.glob("*.tmp-*"))
    for name in runs.PLOTS:
        assert (out / name).stat().st_size > 1000


def test_missing_plots_are_drawn_when_a_finished_run_is_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    train.train(train.Config(epochs=2, out=str(out), **QUICK), log=quiet)
    ckpt = out / "checkpoint.npz"
    before = ckpt.read_bytes()
    for name in runs.PLOTS:
        (out / name).unlink()
    assert main(["train", "--resume", str(ckpt), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "has finished its 2 epochs; nothing to do (pass --epochs N with N > 2" in printed
    assert printed.rstrip().endswith(f"are in {out}")  # the folder used, not runs/latest
    assert ckpt.read_bytes() == before and _epochs(out) == [1, 2]
    for name in runs.PLOTS:
        assert (out / name).exists()
    assert main(["train", "--resume", str(ckpt), "--epochs", "1"]) == 2
    assert "--epochs 1 is fewer than the 2 epochs" in capsys.readouterr().err


def test_config_epochs_extends_a_resumed_run_from_python(tmp_path):
    train.train(train.Config(epochs=3, out=str(tmp_path / "straight"), **QUICK), log=quiet)
    train.train(train.Config(epochs=2, out=str(tmp_path / "split"), **QUICK), log=quiet)
    history, _ = train.train(train.Config(epochs=3, resume=str(tmp_path /
                                                               "split/checkpoint.npz")),
                             log=quiet)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert _same_weights(tmp_path / "straight/checkpoint.npz", tmp_path / "split/checkpoint.npz")


class _Trap(Module):
    """Identity; at its n-th forward (in training, or in eval mode when
    during_eval) it sends this process SIGTERM or SIGINT (Ctrl-C)."""

    def __init__(self, at, what, during_eval=False):
        super().__init__()
        self.calls, self.at, self.what, self.during_eval = 0, at, what, during_eval

    def forward(self, x):
        if self.training != self.during_eval:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGTERM if self.what == "sigterm" else signal.SIGINT)
                if self.what == "twice":  # Ctrl-C again while the step hangs
                    os.kill(os.getpid(), signal.SIGINT)
        return x

    def backward(self, dy, need_input_grad=True):
        return dy


def _trapped(*args):
    gpucnn.manual_seed(0)  # the same initial weights as the built-in model
    return Sequential(*models.digits_net().layers, _Trap(*args))


def _straight(tmp_path, epochs=2):
    out = tmp_path / "straight"
    if not out.exists():
        train.train(train.Config(epochs=epochs, out=str(out), **QUICK), log=quiet)
    return out


@pytest.mark.parametrize("trap", [(3 + 2, "sigterm"), (1, "interrupt", True)],
                         ids=["sigterm-mid-epoch", "ctrl-c-during-evaluation"])
def test_sigterm_and_ctrl_c_in_evaluation_keep_the_epoch_and_resume_exactly(tmp_path, trap,
                                                                          ctrl_c):
    straight = _straight(tmp_path)
    out = tmp_path / "cut"

    def unhandled(signum, frame):  # were train's handler missing, fail instead of dying
        raise AssertionError("SIGTERM reached the test's handler, not train's")

    previous, ctrl_c = signal.signal(signal.SIGTERM, unhandled), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt) as stop:
            train.train(train.Config(epochs=2, out=str(out), **QUICK), model=_trapped(*trap),
                        log=quiet)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # train's handlers are removed
        assert signal.getsignal(signal.SIGINT) is ctrl_c
    finally:
        signal.signal(signal.SIGTERM, previous)
    meta = checkpoint.read(out / "checkpoint.npz")[0]
    if trap[1] == "sigterm":
        assert isinstance(stop.value, runs.Terminated)
        # sent in epoch 2's second step, which finished first: 2 of its 3 steps done
        assert (meta["epoch"], meta["step"]) == (1, 2)
    else:  # all 3 steps of epoch 1 done, its evaluation interrupted
        assert (meta["epoch"], meta["step"], meta["history"]) == (0, 3, [])
    history, _ = train.train(train.Config(resume=str(out / "checkpoint.npz"), **QUICK),
                             model=_trapped(0, "never"), log=quiet)  # from Python: pass it again
    assert _same_weights(straight / "checkpoint.npz", out / "checkpoint.npz")
    assert _epochs(out) == [1, 2]
    expected = checkpoint.read(straight / "checkpoint.npz")[0]["history"]
    for a, b in zip(history, expected):
        assert a["test_loss"] == b["test_loss"] and a["train_loss"] == b["train_loss"]


def test_sigterm_from_outside_exits_143_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gpucnn.app.cli import main; "
            "sys.exit(main(sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, ROOT, "train", "--epochs", "500",
                             "--no-progress", "--out", str(out), "--device", "cpu"],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the first epoch is saved
        if line.startswith("epoch 1/500"):
            break
    proc.send_signal(signal.SIGTERM)
    tail = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + 15
    assert "interrupted" in tail and "--resume" in tail
    meta = checkpoint.read(out / "checkpoint.npz")[0]
    assert meta["epoch"] >= 1 and not list(out.glob("*.tmp-*"))


def test_ctrl_c_while_plotting_keeps_the_epochs_checkpoint(tmp_path):
    out = tmp_path / "run"

    def log(line):  # the epoch's line comes after its checkpoint, before its plots
        if line.startswith("epoch 2/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(train.Config(epochs=2, out=str(out), **QUICK), log=log)
    meta = checkpoint.read(out / "checkpoint.npz")[0]
    assert (meta["epoch"], meta["step"]) == (2, 0) and _epochs(out) == [1, 2]
    assert not (out / "curves.png").exists()
    train.train(train.Config(resume=str(out / "checkpoint.npz"), **QUICK), log=quiet)
    assert (out / "curves.png").exists() and (out / "confusion.png").exists()


def _limited_run(out, limit_bytes, epochs):
    """gpucnn train in a child whose files may not grow past limit_bytes (what a
    full disk does to a write, without needing one)."""
    code = ("import resource, signal, sys; sys.path.insert(0, sys.argv[1]); "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2]))); "
            "from gpucnn.app.cli import main; sys.exit(main(sys.argv[3:]))")
    return subprocess.run([sys.executable, "-c", code, ROOT, str(limit_bytes), "train",
                           "--limit", "96", "--epochs", str(epochs), "--no-progress",
                           "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True)


def test_a_full_disk_is_one_line_that_names_the_surviving_checkpoint(tmp_path):
    done = _limited_run(tmp_path / "first", 20_000, 1)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "no space left to write" in done.stderr and "No checkpoint was written" in \
        done.stderr
    # a checkpoint grows by its history row each epoch: allow epoch 1's, not epoch 2's
    train.train(train.Config(epochs=1, out=str(tmp_path / "probe"), **QUICK), log=quiet)
    size = (tmp_path / "probe" / "checkpoint.npz").stat().st_size
    done = _limited_run(tmp_path / "second", size + 100, 2)
    assert done.returncode == 2, done.stderr
    out = tmp_path / "second"
    assert (f"The last complete checkpoint is {out / 'checkpoint.npz'} (epoch 1)"
            in done.stderr), done.stderr
    assert checkpoint.read(out / "checkpoint.npz")[0]["epoch"] == 1
    assert not list(out.glob("*.tmp-*"))


def test_the_checkpoint_records_blas_threads_and_a_resume_with_others_warns(tmp_path,
                                                                           cpu_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    cpu_threads(1)  # the BLAS's own threads then do the matrix products
    out = tmp_path / "run"
    with threadpoolctl.threadpool_limits(1):
        train.train(train.Config(epochs=1, out=str(out), **QUICK), log=quiet)
    assert checkpoint.read(out / "checkpoint.npz")[0]["blas_threads"] == 1
    lines = []
    with threadpoolctl.threadpool_limits(2):
        if threads_module.blas_threads() != 2:
            pytest.skip("this BLAS cannot run 2 threads")
        train.train(train.Config(epochs=2, resume=str(out / "checkpoint.npz"), **QUICK),
                    log=lines.append)
    assert any("trained with 1 BLAS threads and resumes with 2" in line and
               "OMP_NUM_THREADS=1" in line for line in lines), lines


def test_keep_freed_memory_applies_on_glibc_and_says_so_elsewhere():
    import platform
    assert threads_module.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_progress_bar_only_on_a_terminal(tmp_path, capsys):
    train.train(train.Config(epochs=1, out=str(tmp_path / "a"), dataset="digits", limit=96),
                log=quiet)
    assert "batch" not in capsys.readouterr().err  # pytest's stderr is not a terminal
    assert train.Config().progress is None


def test_the_device_line_is_short_without_cupy(tmp_path):
    if gpucnn.backend.cuda_available():
        pytest.skip("a GPU is usable here")
    lines = []
    train.train(train.Config(epochs=1, out=str(tmp_path), **QUICK), log=lines.append)
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert lines[0] == "gpucnn: training on cpu (CuPy not installed)"


def test_a_signal_inside_a_step_waits_for_its_end(ctrl_c):
    """Between steps SIGINT and SIGTERM raise at once; inside one they are held until
    it ends (so that no step is saved half done); the handlers are put back after."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with runs.interrupts() as guard:
        finished = False
        with pytest.raises(runs.Terminated):
            with guard.step():
                os.kill(os.getpid(), signal.SIGTERM)
                finished = True
        assert finished and guard.pending is None and not guard.cut_short
        with pytest.raises(KeyboardInterrupt) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):  # the handler runs between bytecodes, soon
                pass
        assert type(stop.value) is KeyboardInterrupt
        with guard.step():  # a step with no signal ends normally
            pass
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_second_signal_cuts_a_hanging_step_short(ctrl_c):
    with runs.interrupts() as guard:
        finished = False
        with pytest.raises(KeyboardInterrupt):
            with guard.step():
                os.kill(os.getpid(), signal.SIGINT)  # held
                os.kill(os.getpid(), signal.SIGINT)  # raises at once
                for _ in range(10**6):
                    pass
                finished = True
        assert not finished and guard.cut_short and guard.pending is None


def test_an_ignored_sigint_stays_ignored():
    """A shell starts a background job (cmd &) with SIGINT ignored: training must not
    stop at a Ctrl-C meant for the foreground."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with runs.interrupts() as guard:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            with guard.step():
                os.kill(os.getpid(), signal.SIGINT)
            assert guard.pending is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_inside_a_step_saves_nothing(tmp_path, ctrl_c):
    lines = []
    cfg = train.Config(epochs=2, out=str(tmp_path / "run"), **QUICK)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, model=_trapped(3 + 2, "twice"), log=lines.append)
    assert "interrupted twice inside step 2 of epoch 2" in lines[-1]
    assert "nothing was saved" in lines[-1] and "epoch 1" in lines[-1]
    meta = checkpoint.read(tmp_path / "run/checkpoint.npz")[0]
    assert (meta["epoch"], meta["step"]) == (1, 0)  # the end of epoch 1, untouched
