"""CIFAR-10/100 in each of the four layouts their archives unpack to, written here
the way the real files are made (protocol-2 pickles of dicts with bytes keys, or
label byte(s) followed by 3,072 pixel bytes per record)."""
import json
import pickle

import numpy
import pytest

from gpucnn.app import cifar, data, train
from gpucnn.app.cli import main

FAST = ["--limit", "32", "--epochs", "1", "--no-progress", "--device", "cpu", "--batch-size", "16"]


def _images(n, seed):
    return numpy.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=numpy.uint8)


def _labels(n, classes, seed):
    return numpy.random.default_rng(seed).integers(0, classes, n)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10_py(root, n=20, names=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, file in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        _dump(folder / file, {b"batch_label": file.encode(), b"data": _images(n, i),
                              b"labels": _labels(n, 10, i).tolist(),
                              b"filenames": [b"x.png"] * n})
    if names:
        _dump(folder / "batches.meta", {b"label_names": [s.encode() for s in names],
                                        b"num_vis": 3072, b"num_cases_per_batch": n})
    return folder


def write_cifar100_py(root, n=30):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for i, file in enumerate(("train", "test")):
        _dump(folder / file, {b"data": _images(n, i), b"fine_labels": _labels(n, 100, i).tolist(),
                              b"coarse_labels": _labels(n, 20, i + 7).tolist()})
    return folder


def write_binary(root, sub, files, label_bytes, classes, n=20):
    folder = root / sub
    folder.mkdir(parents=True)
    expected = {}
    for i, file in enumerate(files):
        labels = _labels(n, classes, i).astype(numpy.uint8)[:, None]
        records = numpy.concatenate([numpy.full((n, label_bytes - 1), 19, numpy.uint8), labels,
                                     _images(n, i)], axis=1)
        records.tofile(folder / file)
        expected[file] = labels[:, 0]
    return folder, expected


def test_python_layout_reads_images_labels_and_meta_names(tmp_path):
    names = [f"class{i}" for i in range(10)]
    write_cifar10_py(tmp_path, names=names)
    ds = data.load("cifar10", str(tmp_path))
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert ds.train_x.dtype == numpy.float32 and ds.classes == tuple(names)
    assert ds.train_y.tolist() == numpy.concatenate([_labels(20, 10, i) for i in range(5)]).tolist()
    raw = numpy.concatenate([_images(20, i) for i in range(5)]).reshape(-1, 3, 32, 32) / 255.0
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))
    numpy.testing.assert_allclose(ds.stats["mean"], mean, rtol=1e-9)
    numpy.testing.assert_allclose(ds.stats["std"], std, rtol=1e-7)
    numpy.testing.assert_allclose(ds.train_x, (raw - mean[:, None, None]) / std[:, None, None],
                                  atol=1e-5)


def test_standard_names_without_meta_and_cifar100_fine_labels(tmp_path):
    write_cifar10_py(tmp_path / "a")
    assert data.load("cifar10", str(tmp_path / "a")).classes[:2] == ("airplane", "automobile")
    write_cifar100_py(tmp_path / "b")
    ds = data.load("cifar100", str(tmp_path / "b"))
    assert len(ds.classes) == 100 and ds.classes[-1] == "worm"
    assert ds.test_y.tolist() == _labels(30, 100, 1).tolist()


@pytest.mark.parametrize("name,sub,files,label_bytes,classes", [
    ("cifar10", "cifar-10-batches-bin", [f"data_batch_{k}.bin" for k in range(1, 6)] +
     ["test_batch.bin"], 1, 10),
    ("cifar100", "cifar-100-binary", ["train.bin", "test.bin"], 2, 100)])
def test_binary_layouts(tmp_path, name, sub, files, label_bytes, classes):
    _, expected = write_binary(tmp_path, sub, files, label_bytes, classes)
    ds = data.load(name, str(tmp_path))
    assert ds.test_y.tolist() == expected[files[-1]].tolist()
    assert len(ds.train_y) == 20 * (len(files) - 1)
    first = _images(20, len(files) - 1)[0].reshape(3, 32, 32) / 255.0
    mean, std = (numpy.asarray(ds.stats[k])[:, None, None] for k in ("mean", "std"))
    numpy.testing.assert_allclose(ds.test_x[0], (first - mean) / std, atol=1e-5)


def test_a_pickle_naming_any_other_global_is_refused(tmp_path, capsys):
    folder = write_cifar10_py(tmp_path)
    _dump(folder / "data_batch_3", {b"data": _images(2, 0), b"labels": [1, 2],
                                    b"evil": numpy.random.default_rng(0)})
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r")] + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpucnn: error: ") and err.count("\n") == 1, err
    assert "data_batch_3" in err and "numpy.random" in err and "Traceback" not in err


@pytest.mark.parametrize("damage,needle", [
    (lambda f: (f / "data_batch_2").write_bytes(b"\x80\x02garbage"), "data_batch_2"),
    (lambda f: (f / "test_batch").unlink(), "test_batch not found"),
    (lambda f: _dump(f / "data_batch_1", {b"data": _images(2, 0), b"labels": [3, 10]}),
     "label 10 is out of range 0..9"),
    (lambda f: _dump(f / "data_batch_1", {b"data": _images(2, 0)[:, :100], b"labels": [3, 1]}),
     "shape (2, 100)"),
    (lambda f: _dump(f / "data_batch_1", [1, 2]), "holds a list")])
def test_damaged_files_are_one_line(tmp_path, capsys, damage, needle):
    damage(write_cifar10_py(tmp_path))
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "r")] + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpucnn: error: ") and err.count("\n") == 1 and needle in err, err


def test_truncated_binary_and_missing_folder(tmp_path, capsys):
    folder, _ = write_binary(tmp_path, "cifar-100-binary", ["train.bin", "test.bin"], 2, 100)
    with open(folder / "test.bin", "ab") as f:
        f.write(b"\0" * 5)
    with pytest.raises(data.DataError, match="test.bin: .* not a whole number of 3074-byte"):
        data.load("cifar100", str(tmp_path))
    with pytest.raises(data.DataError, match="no CIFAR files under"):
        data.load("cifar10", str(tmp_path))


@pytest.mark.parametrize("model", ["resnet", "lenet", "digits"])
def test_every_model_trains_evaluates_and_predicts(tmp_path, capsys, model):
    write_cifar10_py(tmp_path / "d", n=16)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "d"), "--model",
                 model, "--out", str(out), "--augment", "crop+flip"] + FAST) == 0
    from gpucnn.app import inference
    model_, meta, _, _ = inference.from_checkpoint(out / "checkpoint.npz", "cpu")
    assert meta["input_shape"] == [3, 32, 32] and len(meta["data_stats"]["mean"]) == 3
    result = train.evaluate_checkpoint(out / "checkpoint.npz", device="cpu", log=lambda *a: None)
    assert result["classes"][0] == "airplane" and 0 <= result["test_accuracy"] <= 1
    image = tmp_path / "x.npy"
    numpy.save(image, _images(2, 9).reshape(2, 3, 32, 32))
    capsys.readouterr()
    assert main(["predict", str(out / "checkpoint.npz"), str(image), "--json",
                 "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and abs(sum(t["probability"] for t in rows[0]["top"]) - 1) < 1


def test_per_channel_stats_reach_the_checkpoint_unchanged_on_resume(tmp_path):
    write_cifar10_py(tmp_path / "d", n=16)
    config = train.Config(dataset="cifar10", data_dir=str(tmp_path / "d"), model="digits",
                          limit=16, epochs=1, batch_size=16, device="cpu", progress=False,
                          out=str(tmp_path / "r"))
    train.train(config, log=lambda *a: None)
    first = json.loads(bytes(numpy.load(tmp_path / "r" / "checkpoint.npz")["meta"]).decode())
    stats = first["data_stats"]
    assert len(stats["mean"]) == 3 and all(s > 0 for s in stats["std"])
    train.train(train.Config(resume=str(tmp_path / "r" / "checkpoint.npz"), epochs=2,
                             data_dir=str(tmp_path / "d"), device="cpu", progress=False),
                log=lambda *a: None)
    again = json.loads(bytes(numpy.load(tmp_path / "r" / "checkpoint.npz")["meta"]).decode())
    assert again["data_stats"] == stats and again["epoch"] == 2


def test_the_restricted_unpickler_reads_numpy_arrays_only(tmp_path):
    path = tmp_path / "f"
    _dump(path, {b"data": numpy.arange(6, dtype=numpy.uint8), b"x": [b"a", 1]})
    d = cifar.read_pickle(path)
    assert d["data"].tolist() == list(range(6)) and d["x"] == [b"a", 1]
    _dump(path, {b"data": [print]})  # a function is pickled as a global
    with pytest.raises(data.DataError, match="names __builtin__.print, which a CIFAR file never"):
        cifar.read_pickle(path)
