import gzip

import numpy
import pytest

from gpucnn.app import data


def _write_set(root, n_train=12, n_test=5, gz=False, sub=""):
    rng = numpy.random.default_rng(0)
    d = root / sub
    d.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    files = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
             "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
             "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, arr in files.items():
        data.write_idx(d / (name + ext), arr)
    return files


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sub", ["", "MNIST/raw", "FashionMNIST/raw"])
def test_idx_round_trip_and_layouts(tmp_path, gz, sub):
    name = "fashion-mnist" if "Fashion" in sub else "mnist"
    files = _write_set(tmp_path, gz=gz, sub=sub)
    ds = data.load(name, tmp_path)
    assert ds.train_x.shape == (12, 1, 28, 28) and ds.train_x.dtype == numpy.float32
    assert ds.test_y.dtype == numpy.int64
    numpy.testing.assert_array_equal(ds.train_y, files["train-labels-idx1-ubyte"])
    raw = files["train-images-idx3-ubyte"] / 255.0
    numpy.testing.assert_allclose(ds.train_x[:, 0] * ds.stats["std"] + ds.stats["mean"], raw,
                                  atol=1e-6)
    assert abs(float(ds.train_x.mean())) < 1e-5
    assert ds.classes[0] == ("T-shirt/top" if name == "fashion-mnist" else "0")


def test_damaged_files_are_named(tmp_path):
    _write_set(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-100])
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte: header declares shape "
                                             r"\(12, 28, 28\) .* \(truncated\)"):
        data.load("mnist", tmp_path)
    images.write_bytes(b"\x00\x00\x08\x01" + good[4:])
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte: magic number 0x00000801 "
                                             "is not that of IDX images"):
        data.load("mnist", tmp_path)
    images.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.load("mnist", tmp_path)
    images.write_bytes(good)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    gzipped = tmp_path / "t10k-labels-idx1-ubyte.gz"
    gzipped.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") +
                                      bytes([1, 2, 3, 12, 4]))[:-4])
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz: cannot be read"):
        data.load("mnist", tmp_path)
    gzipped.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") +
                                      bytes([1, 2, 3, 12, 4])))
    with pytest.raises(data.DataError, match="label 12 is out of range 0..9"):
        data.load("mnist", tmp_path)
    data.write_idx(gzipped, numpy.arange(4))
    with pytest.raises(data.DataError, match="holds 5 images but .* holds 4 labels"):
        data.load("mnist", tmp_path)


def test_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.* not found .*"
                                             "apt-get install dataset-fashion-mnist"):
        data.load("fashion-mnist", tmp_path)
    with pytest.raises(data.DataError, match="does not exist; pass --data-dir"):
        data.load("mnist", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load("imagenet")


def test_digits_split_is_seeded():
    a, b, c = data.load_digits(0), data.load_digits(0), data.load_digits(1)
    assert a.train_x.shape == (1438, 1, 8, 8) and a.test_x.shape == (359, 1, 8, 8)
    numpy.testing.assert_array_equal(a.test_y, b.test_y)
    assert not numpy.array_equal(a.test_y, c.test_y)


def test_batches_follow_the_order_and_skip():
    x, y = numpy.arange(10.0)[:, None], numpy.arange(10)
    order = numpy.array([3, 1, 4, 0, 5, 9, 2, 6, 8, 7])
    got = [yb.tolist() for _, yb in data.batches(x, y, 4, "cpu", order)]
    assert got == [[3, 1, 4, 0], [5, 9, 2, 6], [8, 7]]
    assert [yb.tolist() for _, yb in data.batches(x, y, 4, "cpu", order, start=2)] == [[8, 7]]
    assert data.num_batches(10, 4) == 3
