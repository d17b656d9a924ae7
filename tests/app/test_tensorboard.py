"""`gpucnn train --tensorboard`: the epoch metrics as TensorBoard scalars in
OUT/tensorboard/, each epoch once, a resumed run's too, equal to metrics.jsonl."""
import json
import struct

import pytest

from gpucnn.app import train
from gpucnn.app.cli import main

pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402

QUICK = dict(limit=120, progress=False)


def _scalars(folder):
    """{tag: [(step, value)]} from the event files of folder (TFRecord framing:
    length, its CRC, the Event, its CRC)."""
    out = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_scalars_are_the_metrics_each_epoch_once_across_a_resume(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--limit", "120", "--no-progress", "--tensorboard",
                 "--out", str(out)]) == 0
    train.train(train.Config(epochs=3, resume=str(out / "checkpoint.npz"), tensorboard=True,
                             **QUICK), log=lambda *a: None)
    scalars, rows = _scalars(out / "tensorboard"), _metrics(out)
    assert [step for step, _ in scalars["loss/test"]] == [1, 2, 3]
    for tag, key in (("loss/train", "train_loss"), ("accuracy/test", "test_accuracy")):
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in rows], rel=1e-6)


def test_without_the_option_no_folder_is_written(tmp_path):
    train.train(train.Config(epochs=1, out=str(tmp_path), **QUICK), log=lambda *a: None)
    assert not (tmp_path / "tensorboard").exists()
