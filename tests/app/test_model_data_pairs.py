"""Every built-in model trains on every dataset: a model is built for its data's
image shape and channels, and a checkpoint rebuilds the same
network, old checkpoints (without a recorded input shape) included."""
import json

import numpy
import pytest

from conftest import idx_set
import gpucnn
from gpucnn.app import checkpoint, data, inference, models
from gpucnn.app.cli import main
from gpucnn.errors import ConfigError


@pytest.mark.parametrize("dataset", sorted(data.DATASETS))
@pytest.mark.parametrize("model", sorted(models.MODELS))
def test_every_model_trains_and_evaluates_on_every_dataset(tmp_path, capsys, monkeypatch, model,
                                                           dataset):
    out = tmp_path / "run"
    args = ["train", "--model", model, "--dataset", dataset, "--limit", "16", "--epochs", "1",
            "--batch-size", "8", "--no-progress", "--device", "cpu", "--out", str(out)]
    if dataset.startswith("cifar"):
        from test_cifar import write_binary
        files = ["train.bin", "test.bin"] if dataset == "cifar100" else \
            [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]
        write_binary(tmp_path / "cifar", "", files, 2 if dataset == "cifar100" else 1,
                     data.DATASETS[dataset].num_classes, n=8)
        args += ["--data-dir", str(tmp_path / "cifar")]
    elif dataset == "folder":
        from test_image_folder import _write
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        args += ["--data-dir", str(_write(tmp_path / "images", size=(8, 8)))]
    elif dataset != "digits":
        args += ["--data-dir", str(idx_set(tmp_path / "idx", n_train=16, n_test=8))]
    assert main(args) == 0, capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err
    assert main(["eval", str(out / "checkpoint.npz"), "--device", "cpu"]) == 0
    net = gpucnn.load(str(out / "checkpoint.npz"), device="cpu")
    assert net.input_shape == (data.DATASETS[dataset].input_shape if dataset != "folder"
                               else (3, 8, 8))


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_a_model_built_for_its_own_shape_is_todays_network(name):
    """Same layers and the same random draws in the same order as the builder's default."""
    spec = models.MODELS[name]
    gpucnn.manual_seed(3)
    built = spec.build(num_classes=10, input_shape=spec.input_shape).state_dict()
    gpucnn.manual_seed(3)
    plain = spec.builder().state_dict()
    assert list(built) == list(plain)
    for key in plain:
        assert numpy.array_equal(built[key], plain[key]), key


def test_linear_follows_the_image_size():
    lenet8 = models.MODELS["lenet"].build(num_classes=10, input_shape=(3, 8, 8))
    digits28 = models.MODELS["digits"].build(num_classes=10, input_shape=(1, 28, 28))
    assert lenet8.forward(numpy.zeros((2, 3, 8, 8), numpy.float32)).shape == (2, 10)
    assert digits28.forward(numpy.zeros((2, 1, 28, 28), numpy.float32)).shape == (2, 10)
    resnet = models.MODELS["resnet"].build(num_classes=10, input_shape=(3, 8, 8))
    assert resnet.forward(numpy.zeros((2, 3, 8, 8), numpy.float32)).shape == (2, 10)


def test_too_small_an_image_is_one_clear_error():
    with pytest.raises(ConfigError, match="model lenet needs images of at least 4x4 pixels"):
        models.MODELS["lenet"].build(num_classes=10, input_shape=(1, 3, 3))


def test_old_checkpoint_without_input_shape_still_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--limit", "32", "--epochs", "1", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    path = out / "checkpoint.npz"
    with numpy.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    for key in ("input_shape", "in_channels"):
        meta.pop(key)
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode(), dtype=numpy.uint8)
    old = tmp_path / "old.npz"
    numpy.savez(old, **arrays)
    net = inference.build_recorded(checkpoint.read(old)[0])
    assert [tuple(v.shape) for v in net.state_dict().values()] == \
        [tuple(v.shape) for v in models.digits_net().state_dict().values()]
    capsys.readouterr()
    assert main(["eval", str(old), "--device", "cpu"]) == 0
    assert "test set after epoch 1" in capsys.readouterr().out
