"""Extending a finished run re-plans its schedule over the new total and says so:
a cosine reaches 0 at the new end instead of climbing back."""
import math

from gpucnn.app import checkpoint
from gpucnn.app.cli import main

BASE = ["train", "--limit", "64", "--batch-size", "32", "--optimizer", "sgd", "--lr", "0.1",
        "--no-progress", "--device", "cpu"]


def _extend(tmp_path, capsys, schedule, first, then):
    out = tmp_path / schedule
    assert main(BASE + ["--schedule", schedule, "--epochs", str(first), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint.npz"), "--epochs", str(then),
                 "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "re-planned" in line]
    assert len(lines) == 1, lines
    return checkpoint.read(out / "checkpoint.npz")[0], lines[0]


def test_extending_a_cosine_run_re_plans_it_to_end_at_zero(tmp_path, capsys):
    meta, line = _extend(tmp_path, capsys, "cosine", 1, 2)
    assert meta["schedule"]["T_max"] == 4 and meta["schedule"]["last_step"] == 4
    assert meta["optimizer"]["hyper"]["lr"] == 0.0  # the old plan would be back at 0.1
    assert "re-planned over all 2 epochs (4 steps)" in line
    assert "at step 2 goes from 0 to 0.05" in line


def test_extending_a_step_run_re_plans_its_decays(tmp_path, capsys):
    meta, line = _extend(tmp_path, capsys, "step", 3, 6)
    assert meta["schedule"]["step_size"] == 4
    assert math.isclose(meta["optimizer"]["hyper"]["lr"], 0.1 * 0.1 ** 3)
    assert "step schedule is re-planned over all 6 epochs" in line


def test_a_resume_that_keeps_the_length_keeps_the_plan(tmp_path, capsys):
    out = tmp_path / "same"
    assert main(BASE + ["--schedule", "cosine", "--epochs", "2", "--out", str(out)]) == 0
    before = checkpoint.read(out / "checkpoint.npz")[0]["schedule"]
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "checkpoint.npz"), "--no-progress"]) == 0
    assert "re-planned" not in capsys.readouterr().out
    assert checkpoint.read(out / "checkpoint.npz")[0]["schedule"] == before
