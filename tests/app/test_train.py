"""The main job end to end on the bundled digits: CLI, checkpoints, resume, stops."""
import json
import os
import signal
import subprocess
import sys

import numpy
import pytest

import gpucnn
from gpucnn import backend
from gpucnn.app import checkpoint, models, train
from gpucnn.tools import gradcheck
from gpucnn.app.cli import main
from gpucnn.nn import Module, Sequential

QUICK = dict(dataset="digits", limit=256, batch_size=32, progress=False)


def _weights(path):
    return checkpoint.read(path)[1]


def test_cli_train_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--limit", "256", "--epochs", "2", "--out", str(out), "--no-progress",
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "training on cpu (cpu requested (argument))" in printed
    assert "epoch 2/2: train loss" in printed and "test accuracy" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]) >= {"train_loss", "test_loss", "test_accuracy", "images_per_s",
                            "elapsed_s"}
    for name in ("checkpoint.npz", "curves.png", "confusion.png"):
        assert (out / name).stat().st_size > 1000
    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    assert "digits test set after epoch 2" in capsys.readouterr().out


def test_default_digits_run_reaches_95_percent(tmp_path):
    history, _ = train.train(train.Config(out=str(tmp_path), progress=False), log=lambda *a: None)
    assert history[-1]["test_accuracy"] >= 0.95


def test_resume_gives_the_same_weights(tmp_path):
    quiet = lambda *a: None  # noqa: E731
    train.train(train.Config(epochs=3, out=str(tmp_path / "straight"), **QUICK), log=quiet)
    train.train(train.Config(epochs=2, out=str(tmp_path / "split"), **QUICK), log=quiet)
    history, _ = train.train(train.Config(epochs=3, out=str(tmp_path / "split"),
                                          resume=str(tmp_path / "split/checkpoint.npz"),
                                          **QUICK), log=quiet)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    a, b = _weights(tmp_path / "straight/checkpoint.npz"), _weights(tmp_path /
                                                                     "split/checkpoint.npz")
    for k in a:
        assert numpy.array_equal(a[k], b[k]), k


def test_resume_refuses_other_settings(tmp_path):
    train.train(train.Config(epochs=1, out=str(tmp_path), **QUICK), log=lambda *a: None)
    cfg = train.Config(epochs=2, lr=0.5, out=str(tmp_path), resume=str(tmp_path /
                                                                      "checkpoint.npz"), **QUICK)
    with pytest.raises(ValueError, match=r"lr=0.5 \(checkpoint: 0.002\)"):
        train.train(cfg, log=lambda *a: None)


class _Trap(Module):
    """Identity until its n-th forward in training, then NaN or Ctrl-C."""

    def __init__(self, at, what):
        super().__init__()
        self.calls, self.at, self.what = 0, at, what

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                if self.what == "interrupt":  # Ctrl-C, as the terminal sends it
                    os.kill(os.getpid(), signal.SIGINT)
                    return x
                return x * numpy.nan
        return x

    def backward(self, dy, need_input_grad=True):
        return dy


def _trapped(at, what):
    gpucnn.manual_seed(0)  # the same initial weights as the built-in model
    return Sequential(*models.digits_net().layers, _Trap(at, what))


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = train.Config(epochs=3, out=str(tmp_path), **QUICK)
    with pytest.raises(train.TrainingDiverged, match=r"loss became nan at epoch 2, step 3; "
                                                     r".*checkpoint.npz.*--lr 0.0002"):
        train.train(cfg, model=_trapped(8 + 3, "nan"), log=lambda *a: None)
    meta = checkpoint.read(tmp_path / "checkpoint.npz")[0]
    assert meta["epoch"] == 1 and len(meta["history"]) == 1
    assert all(numpy.isfinite(w).all() for w in _weights(tmp_path / "checkpoint.npz").values())


def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path, ctrl_c):
    quiet = lambda *a: None  # noqa: E731
    train.train(train.Config(epochs=2, out=str(tmp_path / "straight"), **QUICK), log=quiet)
    cfg = train.Config(epochs=2, out=str(tmp_path / "cut"), **QUICK)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, model=_trapped(8 + 5, "interrupt"), log=quiet)
    # the signal came in step 5's forward pass: step 5 finished, then training stopped
    assert checkpoint.read(tmp_path / "cut/checkpoint.npz")[0]["step"] == 5
    train.train(train.Config(epochs=2, out=str(tmp_path / "cut"),
                             resume=str(tmp_path / "cut/checkpoint.npz"), **QUICK),
                model=_trapped(0, "never"), log=quiet)  # a model from Python: pass it again
    a, b = _weights(tmp_path / "straight/checkpoint.npz"), _weights(tmp_path /
                                                                     "cut/checkpoint.npz")
    for k in a:
        assert numpy.array_equal(a[k], b[k]), k


def test_checkpoint_errors(tmp_path):
    train.train(train.Config(epochs=1, out=str(tmp_path), **QUICK), log=lambda *a: None)
    path = tmp_path / "checkpoint.npz"
    with pytest.raises(checkpoint.CheckpointError, match="written for another model"):
        checkpoint.restore(path, models.lenet())
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(path.read_bytes()[:500])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable gpucnn checkpoint"):
        checkpoint.read(damaged)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read(tmp_path / "missing.npz")
    assert not list(tmp_path.glob("*.tmp-*"))  # atomic writes leave no temporary files


def test_cli_errors_and_help(tmp_path, capsys):
    assert main(["train", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert "epochs must be a positive int, got 0" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["gradcheck", "--device", "cpu"]) == 0
    cases = len(gradcheck.cases(numpy.random.default_rng(0)))
    assert f"{cases} passed, 0 failed" in capsys.readouterr().out
    assert main(["info"]) == 0  # every kernel compiles with NVRTC (or NVRTC is absent)
    done = subprocess.run([sys.executable, "-m", "gpucnn", "train", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--resume CHECKPOINT" in done.stdout


def test_a_custom_model_trains_and_its_checkpoint_says_how_to_load_it(tmp_path):
    gpucnn.manual_seed(0)
    net = Sequential(gpucnn.Flatten(), gpucnn.Linear(64, 32), gpucnn.ReLU(),
                     gpucnn.Linear(32, 10))
    history, model = train.train(train.Config(epochs=4, out=str(tmp_path), **QUICK), model=net,
                                 log=lambda *a: None)
    assert model is net and history[-1]["test_accuracy"] > 0.3  # chance is 0.1
    with pytest.raises(checkpoint.CheckpointError, match="model passed in from Python"):
        train.evaluate_checkpoint(tmp_path / "checkpoint.npz")
    again = Sequential(gpucnn.Flatten(), gpucnn.Linear(64, 32), gpucnn.ReLU(),
                       gpucnn.Linear(32, 10))
    checkpoint.restore(tmp_path / "checkpoint.npz", again)
    for k, v in net.state_dict().items():
        assert numpy.array_equal(backend.to_numpy(v), backend.to_numpy(again.state_dict()[k]))


def test_resume_keeps_the_runs_epochs_and_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--limit", "96", "--epochs", "3", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    ckpt = out / "checkpoint.npz"
    assert checkpoint.read(ckpt)[0]["epoch"] == 3
    assert main(["train", "--resume", str(ckpt), "--epochs", "4", "--no-progress"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert main(["train", "--resume", str(ckpt), "--lr", "0.5"]) == 2
    assert "lr=0.5 (checkpoint: 0.002)" in capsys.readouterr().err
    bogus = tmp_path / "bogus.npz"
    numpy.savez(bogus, meta=numpy.frombuffer(b'{"epoch": 1}', dtype=numpy.uint8))
    assert main(["train", "--resume", str(bogus)]) == 2
    assert "was not written by gpucnn train" in capsys.readouterr().err
