"""A run that stops before its first checkpoint leaves no folder that blocks a
rerun, and its NaN stop is one line."""
import json
import os

from gpucnn.app.cli import main

NAN = ["train", "--lr", "1000", "--optimizer", "sgd", "--epochs", "3", "--limit", "256",
       "--no-progress", "--device", "cpu"]
GOOD = ["train", "--limit", "64", "--epochs", "1", "--no-progress", "--device", "cpu"]


def test_a_nan_stop_is_one_line_and_the_folder_can_be_reused(tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(NAN + ["--out", str(out)]) == 3
    assert not out.exists()  # nothing was saved: no folder is left behind
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpucnn: error: the loss became "), err
    assert "RuntimeWarning" not in err and "No checkpoint was written" in err
    assert "overflow encountered" in err  # NumPy's warning, reported once, in that line
    assert main(GOOD + ["--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "checkpoint.npz").exists()


def test_a_folder_left_with_an_empty_metrics_file_is_reused(tmp_path, capsys):
    out = tmp_path / "left"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # what a NaN stop left before
    assert main(GOOD + ["--out", str(out)]) == 0, capsys.readouterr().err
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1]


def test_metrics_without_a_checkpoint_never_point_at_a_missing_file(tmp_path, capsys):
    out = tmp_path / "half"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps(dict(epoch=1)) + "\n")
    assert main(GOOD + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" not in err and "--overwrite" in err, err
    assert "no checkpoint.npz" in err
    assert main(GOOD + ["--out", str(out), "--overwrite"]) == 0


def test_a_crashed_start_leaves_no_empty_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(NAN) == 3
    assert not os.path.exists("runs") or os.listdir("runs") == []


def test_float_warnings_in_an_epoch_are_reported_once_by_gpucnn(recwarn):
    import warnings

    import numpy
    from gpucnn.app import train
    lines = []
    caught = train._FloatWarnings(lines.append)
    for index in range(2):
        with caught.watch(train._Epoch(index, step=6)):
            numpy.float32(1e38) * numpy.float32(10)  # overflow, twice per epoch
            numpy.ones(2) / numpy.zeros(2)
            warnings.warn("not a floating-point matter", UserWarning)
    assert lines == ["gpucnn: warning: NumPy reported overflow encountered in scalar multiply "
                     "in epoch 1, step 7; the loss stayed finite, but a lower learning rate may "
                     "be safer"]
    assert [str(w.message) for w in recwarn] == ["not a floating-point matter"] * 2
