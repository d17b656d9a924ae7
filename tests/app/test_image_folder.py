"""--dataset folder: one subfolder of images per class, with train/ and test/ (or
val/) subfolders or a seeded stratified split; decoded once into the user cache."""
import json

import numpy
import pytest
from PIL import Image

from gpucnn.app import config, data, imagefolder, train
from gpucnn.app.cli import main

FAST = ["--epochs", "1", "--no-progress", "--device", "cpu", "--batch-size", "8"]


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _write(folder, classes=("cat", "dog"), n=5, size=(12, 10), mode="RGB", seed=0):
    """n images per class, each class a different mean colour; size is (W, H)."""
    rng = numpy.random.default_rng(seed)
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = rng.integers(0, 60, shape) + 150 * k
            Image.fromarray(pixels.astype(numpy.uint8), mode).save(
                folder / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return folder


def _truncate(path):
    path.write_bytes(path.read_bytes()[:80])


def _meta(path):
    return json.loads(bytes(numpy.load(path)["meta"]).decode())


def test_split_is_seeded_stratified_and_sized_by_the_data(tmp_path):
    root = _write(tmp_path / "d", n=10)
    Image.new("RGB", (30, 20)).save(root / "cat" / "odd.png")  # one odd size: not the common one
    ds = data.load("folder", str(root), seed=0, options=dict(val_split=0.2))
    assert ds.classes == ("cat", "dog") and ds.image_shape == (3, 10, 12)
    assert numpy.bincount(ds.test_y).tolist() == [2, 2]  # round(11 * 0.2) and round(10 * 0.2)
    assert numpy.bincount(ds.train_y).tolist() == [9, 8]
    again = data.load("folder", str(root), seed=0, options=dict(val_split=0.2))
    other = data.load("folder", str(root), seed=1, options=dict(val_split=0.2))
    numpy.testing.assert_array_equal(ds.test_x, again.test_x)
    assert not numpy.array_equal(ds.test_x, other.test_x)
    assert len(ds.stats["mean"]) == 3
    numpy.testing.assert_allclose(ds.train_x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    numpy.testing.assert_allclose(ds.train_x.std(axis=(0, 2, 3)), 1, atol=1e-4)


def test_given_train_and_val_folders_gray_and_options(tmp_path):
    _write(tmp_path / "d" / "train", mode="L", n=4)
    _write(tmp_path / "d" / "val", mode="L", n=2, seed=1)
    ds = data.load("folder", str(tmp_path / "d"), options=dict(image_size="8x6"))
    assert ds.image_shape == (1, 8, 6) and len(ds.train_y) == 8 and len(ds.test_y) == 4
    rgb = data.load("folder", str(tmp_path / "d"), options=dict(channels=3, image_size="5"))
    assert rgb.image_shape == (3, 5, 5)


def test_decoding_runs_once_into_the_cache(tmp_path, cache_home, monkeypatch):
    root = _write(tmp_path / "d")
    first = data.load("folder", str(root))
    imagefolder.pixels([(p, 0) for p in sorted((root / "cat").iterdir())][:3], (3, 10, 12))
    assert len(list((cache_home / "gpucnn" / "folders").glob("*.npy"))) == 3  # train, test, the 3

    def refuse(*a):
        raise AssertionError("decoded again")
    monkeypatch.setattr(imagefolder, "_decode", refuse)
    numpy.testing.assert_array_equal(data.load("folder", str(root)).train_x, first.train_x)
    monkeypatch.setattr(imagefolder, "IN_MEMORY_SHARE", 0.0)  # as if it did not fit
    mapped = data.load("folder", str(root))
    numpy.testing.assert_array_equal(mapped.train_x, first.train_x)
    items = [(p, 0) for p in sorted((root / "cat").iterdir())]
    assert isinstance(imagefolder.pixels(items[:3], (3, 10, 12)), numpy.memmap)
    _write(root, classes=("cat",), n=1, size=(12, 10), seed=5)  # a file changed: decode again
    with pytest.raises(AssertionError, match="decoded again"):
        data.load("folder", str(root))


def test_unreadable_files_are_one_warning_line(tmp_path):
    root = _write(tmp_path / "d")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = []
    history, _ = train.train(train.Config(dataset="folder", data_dir=str(root), epochs=1,
                                          device="cpu", progress=False, out=str(tmp_path / "r")),
                             log=lines.append)
    warning = [line for line in lines if "warning" in line]
    assert len(warning) == 1 and "skipped 2 file(s)" in warning[0]
    assert "notes.txt" in warning[0] and "broken.png" in warning[0]


@pytest.mark.parametrize("make,argv,needle", [
    (lambda r: (_write(r), (r / "bird").mkdir()), [], "class(es) bird have no readable images"),
    (lambda r: (_write(r / "train"), _write(r / "test", classes=("cat",))), [],
     "does not hold the classes of"),
    (lambda r: _write(r, n=1), [], "has 1 image(s)"),
    (lambda r: _write(r), ["--val-split", "1.5"], "val_split must be in (0, 1), got 1.5"),
    (lambda r: _write(r), ["--image-size", "big"], "image_size must be N or HxW"),
    (lambda r: r.mkdir(), [], "has no subfolders"),
    (lambda r: _truncate(_write(r) / "dog" / "3.png"), [],
     "3.png: its header reads but its pixels do not")])
def test_folder_mistakes_are_one_line(tmp_path, capsys, make, argv, needle):
    make(tmp_path / "d")
    assert main(["train", "--dataset", "folder", "--data-dir", str(tmp_path / "d"), "--out",
                 str(tmp_path / "r")] + argv + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpucnn: error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err


def test_channels_is_one_or_three(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--dataset", "folder", "--data-dir", ".", "--channels", "2"])
    assert caught.value.code == 2 and "invalid choice: 2" in capsys.readouterr().err


def test_folder_options_belong_to_folder_and_folder_needs_a_dir():
    with pytest.raises(ValueError, match="--val-split applies to --dataset folder, not mnist"):
        config.Config(dataset="mnist", val_split=0.3).filled()
    with pytest.raises(ValueError, match="--dataset folder needs --data-dir PATH"):
        config.Config(dataset="folder").filled()
    assert config.Config(dataset="mnist").filled().val_split is None
    assert config.Config(dataset="folder", data_dir="x").filled().val_split == 0.2
    assert {"val_split", "channels", "image_size"} <= set(config.RUN_KEYS)


@pytest.mark.parametrize("model", ["lenet", "resnet"])
def test_train_eval_predict_and_resume(tmp_path, capsys, model):
    root = _write(tmp_path / "d", classes=("apple", "pear", "plum"), n=6)
    out = tmp_path / "r"
    assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--model", model,
                 "--image-size", "8", "--out", str(out), "--augment", "crop+flip"] + FAST) == 0
    meta = _meta(out / "checkpoint.npz")
    assert meta["classes"] == ["apple", "pear", "plum"] and meta["input_shape"] == [3, 8, 8]
    assert meta["config"]["image_size"] == "8" and meta["config"]["val_split"] == 0.2
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.npz"), "--device", "cpu"]) == 0
    assert "apple" in capsys.readouterr().out
    assert main(["predict", str(out / "checkpoint.npz"), str(root / "pear" / "1.png"), "--json",
                 "--device", "cpu"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert {t["class"] for t in top} == {"apple", "pear", "plum"}
    assert main(["train", "--resume", str(out / "checkpoint.npz"), "--image-size", "9",
                 "--data-dir", str(root)] + FAST) == 2
    assert "image_size='9' (checkpoint: '8')" in capsys.readouterr().err
    assert main(["train", "--resume", str(out / "checkpoint.npz"), "--data-dir", str(root),
                 "--epochs", "2", "--no-progress", "--device", "cpu"]) == 0
    assert _meta(out / "checkpoint.npz")["data_stats"] == meta["data_stats"]


def test_eval_refuses_a_folder_with_other_classes(tmp_path, capsys):
    root = _write(tmp_path / "d")
    assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--out",
                 str(tmp_path / "r")] + FAST) == 0
    other = _write(tmp_path / "e", classes=("ant", "bee"))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r" / "checkpoint.npz"), "--data-dir", str(other),
                 "--device", "cpu"]) == 2
    assert "are not the checkpoint's (cat, dog)" in capsys.readouterr().err


def test_predict_reads_an_image_as_training_decoded_it(tmp_path):
    """No light-background inversion for a folder's (grayscale) images, the same resize."""
    from gpucnn.app import inference
    root = _write(tmp_path / "d", mode="L", size=(9, 7))
    (root / "dog" / "light.png").unlink(missing_ok=True)
    Image.fromarray(numpy.full((7, 9), 240, numpy.uint8), "L").save(root / "dog" / "light.png")
    out = tmp_path / "r"
    assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--image-size", "5x4",
                 "--out", str(out)] + FAST) == 0
    model = inference.load(str(out / "checkpoint.npz"), device="cpu")
    assert model.input_shape == (1, 5, 4) and model.invert_light is False
    [(_, x)] = inference.read_inputs([root / "dog" / "light.png"], model.input_shape,
                                     model.invert_light)
    items = [(root / "dog" / "light.png", 1)]
    decoded = imagefolder.pixels(items, (1, 5, 4))
    numpy.testing.assert_array_equal(numpy.round(x * 255), decoded[0])
    assert decoded.min() == 240


def test_a_checkpoint_from_before_the_folder_settings_still_resumes():
    saved = {k: None for k in config.RUN_KEYS if k not in config.FOLDER_KEYS}
    saved.update(dataset="mnist", epochs=3)
    merged = config.merge_resume(config.Config(resume="runs/x/checkpoint.npz"),
                                 dict(config=saved, epoch=1))
    assert merged.val_split is None and merged.filled().val_split is None
    with pytest.raises(ValueError, match="val_split=0.3 \\(checkpoint: None\\)"):
        config.merge_resume(config.Config(resume="runs/x/checkpoint.npz", val_split=0.3),
                            dict(config=saved, epoch=1))
