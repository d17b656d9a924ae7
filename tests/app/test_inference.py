"""Inference: gpucnn.load, `gpucnn predict` on PNG/JPEG images and .npy arrays,
and Module.summary."""
import json

import numpy
import pytest

import gpucnn
from gpucnn import backend
from gpucnn.app import data, inference, train
from gpucnn.app.cli import main

Image = pytest.importorskip("PIL.Image", reason="Pillow is in the train and test extras")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    history, _ = train.train(train.Config(epochs=6, out=str(out), progress=False),
                             log=lambda *a: None)
    return out / "checkpoint.npz", history


@pytest.fixture(scope="module")
def digits():
    """The run's test images as pixels in [0, 1] (what a user has), and labels."""
    ds = data.load("digits")
    return ds.test_x * ds.stats["std"] + ds.stats["mean"], ds.test_y


def test_load_gives_the_trained_model_ready_for_inference(run, digits):
    path, history = run
    model = gpucnn.load(path)
    # the automatic device, as training took: the GPU where there is one
    assert not model.training and model.device == backend.resolve_device()[0]
    assert gpucnn.load(path, device="cpu").device == "cpu"
    assert model.classes == tuple("0123456789") and model.input_shape == (1, 8, 8)
    x, y = digits
    probs = inference.probabilities(model, x)
    assert probs.shape == (len(y), 10) and numpy.allclose(probs.sum(1), 1)
    assert (probs.argmax(1) == y).mean() == history[-1]["test_accuracy"]


def test_load_of_a_custom_model_needs_it(tmp_path):
    gpucnn.manual_seed(0)
    net = gpucnn.Sequential(gpucnn.Flatten(), gpucnn.Linear(64, 10))
    train.train(train.Config(epochs=1, limit=64, out=str(tmp_path), progress=False), model=net,
                log=lambda *a: None)
    with pytest.raises(gpucnn.app.checkpoint.CheckpointError, match=r"gpucnn.load\(path, model="):
        gpucnn.load(tmp_path / "checkpoint.npz")
    other = gpucnn.Sequential(gpucnn.Flatten(), gpucnn.Linear(64, 10))
    loaded = gpucnn.load(tmp_path / "checkpoint.npz", model=other)
    assert loaded is other and numpy.array_equal(backend.to_numpy(other[1].weight.data),
                                                 backend.to_numpy(net[1].weight.data))


def _png(path, pixels, light_background=False, scale=8):
    """An 8-bit grayscale image of pixels in [0, 1], enlarged, optionally as dark ink on white."""
    img = numpy.kron(pixels, numpy.ones((scale, scale)))
    if light_background:
        img = 1 - img
    Image.fromarray(numpy.round(img * 255).astype(numpy.uint8)).save(path)
    return path


def test_read_image_inverts_light_backgrounds_and_resizes(tmp_path):
    square = numpy.zeros((8, 8))
    square[2:6, 2:6] = 1.0
    for light in (False, True):
        x = inference.read_image(_png(tmp_path / f"sq{light}.png", square, light), (1, 8, 8))
        assert x.shape == (1, 8, 8)
        numpy.testing.assert_allclose(x[0], square, atol=0.02)  # light strokes on dark


def test_predict_images_and_arrays(run, digits, tmp_path, capsys):
    path, _ = run
    x, y = digits
    model = gpucnn.load(path)
    expected = inference.probabilities(model, x[:12]).argmax(1)
    files = [str(_png(tmp_path / f"{i}.png", x[i, 0], light_background=i % 2 == 1))
             for i in range(12)]
    Image.open(files[0]).convert("RGB").save(tmp_path / "0.jpg", quality=95)
    numpy.save(tmp_path / "batch.npy", x[:12, 0])           # (N, H, W) floats
    numpy.save(tmp_path / "one.npy", numpy.round(x[3, 0] * 255).astype(numpy.uint8))  # uint8
    assert main(["predict", str(path), *files, str(tmp_path / "0.jpg"), str(tmp_path /
                 "batch.npy"), str(tmp_path / "one.npy"), "--top", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 12 + 1 + 12 + 1
    for row in rows:
        assert len(row["top"]) == 2 and row["top"][0]["probability"] >= row["top"][1][
            "probability"]
        assert row["top"][0]["class"] == str(row["top"][0]["index"])
    from_images = [r["top"][0]["index"] for r in rows[:12]]
    assert numpy.mean(numpy.array(from_images) == expected) >= 10 / 12  # resampled twice
    assert rows[12]["top"][0]["index"] == from_images[0]                # the JPEG
    assert [r["file"] for r in rows[13:15]] == [f"{tmp_path / 'batch.npy'}[{i}]" for i in (0, 1)]
    assert [r["top"][0]["index"] for r in rows[13:25]] == expected.tolist()  # arrays: exact
    assert rows[25]["top"][0]["index"] == expected[3]
    assert main(["predict", str(path), files[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{files[0]}: {expected[0]} (") and line.count("%") == 3


def test_predict_errors(run, tmp_path, capsys):
    path, _ = run
    (tmp_path / "notes.txt").write_text("hello")
    numpy.save(tmp_path / "wrong.npy", numpy.zeros((28, 28)))
    cases = [([str(tmp_path / "missing.png")], "missing.png: file not found"),
             ([str(tmp_path / "notes.txt")], "notes.txt: not an image Pillow can read"),
             ([str(tmp_path / "wrong.npy")], "array of shape (28, 28) does not fit the "
                                             "model's input (1, 8, 8)"),
             ([str(tmp_path / "wrong.npy"), "--top", "0"], "--top must be a positive int")]
    for args, needle in cases:
        assert main(["predict", str(path), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_summary_lists_shapes_and_parameters():
    gpucnn.manual_seed(0)
    net = gpucnn.app.models.digits_net()
    x = numpy.zeros((2, 1, 8, 8), numpy.float32)
    net.train()
    net(x)  # a pending forward, whose saved activations summary must keep
    lines = []
    total = net.summary((1, 8, 8), print_fn=lines.append)
    text = lines[0]
    assert total == sum(p.data.size for p in net.parameters()) == 16 * 9 + 16 + 32 * 16 * 9 + \
        32 + 128 * 64 + 64 + 64 * 10 + 10
    assert f"Total params: {total:,}" in text
    rows = [line.split() for line in text.splitlines()[3:13]]
    assert [r[0] for r in rows] == [str(i) for i in range(10)]
    assert rows[0][1:] == ["(Conv2D)", "(16,", "8,", "8)", "160"]
    assert rows[5][1:] == ["(MaxPool2D)", "(32,", "2,", "2)", "0"]
    assert rows[9][1:] == ["(Linear)", "(10,)", "650"]
    assert net.training
    net.backward(numpy.ones((2, 10), numpy.float32))  # the pending forward still works
    with pytest.raises(ValueError, match="input_shape must be a tuple of positive ints"):
        net.summary(8)
    with pytest.raises(ValueError, match=r"layer 7 \(Linear\), input of shape \(1, 2048\)"):
        net.summary((1, 32, 32))
