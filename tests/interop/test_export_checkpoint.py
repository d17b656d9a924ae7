"""`gpucnn export CHECKPOINT model.onnx`'s work: the trained model of a checkpoint
(gpucnn.load) to ONNX with its input shape, normalisation and class names, run in
onnxruntime on raw pixels against gpucnn's probabilities (rtol 1e-4, atol 1e-5)."""
import json

import numpy
import pytest

import gpucnn
from gpucnn.app import data, inference, train

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def test_a_trained_checkpoint_exports_as_it_was_trained(tmp_path):
    train.train(train.Config(epochs=1, limit=64, out=str(tmp_path), progress=False),
                log=lambda *a: None)
    model = gpucnn.load(tmp_path / "checkpoint.npz", device="cpu")
    path = gpucnn.onnx_export.export(model, tmp_path / "model.onnx")
    ds = data.load("digits")
    pixels = (ds.test_x[:5] * ds.stats["std"] + ds.stats["mean"]).astype(numpy.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": pixels})[0]
    e = numpy.exp(logits - logits.max(axis=1, keepdims=True))
    numpy.testing.assert_allclose(e / e.sum(axis=1, keepdims=True),
                                  inference.probabilities(model, pixels), rtol=1e-4, atol=1e-5)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["classes"] == list(model.classes) and meta["input_shape"] == [1, 8, 8]
    assert meta["normalization"]["in_graph"] is True
    assert meta["normalization"]["mean"] == [pytest.approx(ds.stats["mean"])]


def test_the_export_command_writes_a_file_onnxruntime_runs(tmp_path, capsys):
    from gpucnn.app.cli import main
    train.train(train.Config(epochs=1, limit=64, out=str(tmp_path), progress=False),
                log=lambda *a: None)
    out = tmp_path / "digits.onnx"
    assert main(["export", str(tmp_path / "checkpoint.npz"), str(out)]) == 0
    assert "digits.onnx" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": numpy.zeros((3, 1, 8, 8), numpy.float32)})[0].shape == (3, 10)


def test_the_export_command_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from gpucnn.app.cli import main
    assert main(["export", str(tmp_path / "none.npz"), str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpucnn: error: ") and err.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_the_export_command_refuses_a_missing_output_folder_in_one_line(tmp_path, capsys):
    from gpucnn.app.cli import main
    train.train(train.Config(epochs=1, limit=64, out=str(tmp_path), progress=False),
                log=lambda *a: None)
    out = tmp_path / "nodir" / "m.onnx"
    assert main(["export", str(tmp_path / "checkpoint.npz"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpucnn: error: cannot write") and err.count("\n") == 1
