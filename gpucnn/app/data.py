"""Datasets: scikit-learn's 8x8 digits (bundled), MNIST-format IDX files
(MNIST, Fashion-MNIST) and CIFAR-10/100 files (gpucnn.app.cifar) from a directory.
Nothing is downloaded.

DATASETS registers each one once, as a DatasetSpec: how it loads, its image
shape and classes, the training settings it defaults to and whether a flipped
image keeps its class. Every loader returns a Dataset of float32 images
(N, C, H, W), standardised with the training set's mean and standard deviation
(one pair for the grayscale datasets, one per channel for colour ones: stats then
holds lists), and int64 labels.
"""
import gzip
import os
import pathlib
import types
import zlib
from dataclasses import dataclass

import numpy

from .. import backend
from ..validate import choice
from . import cifar, imagefolder
from .cifar import CIFAR10_CLASSES, CIFAR100_CLASSES  # noqa: F401
from .dataset import (DataError, Dataset, standardise, channel_stats,  # noqa: F401
                      stats_arrays, standardise_channels)

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def load_digits(seed=0, test_fraction=0.2, stats=None):
    """scikit-learn's 1,797 8x8 digits, split by a seeded permutation."""
    from sklearn.datasets import load_digits as sk_digits
    bunch = sk_digits()
    x = bunch.images.astype(numpy.float64)[:, None] / 16.0
    y = bunch.target.astype(numpy.int64)
    order = numpy.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    train_x, test_x, stats = standardise(x[train], x[test], stats)
    return Dataset("digits", train_x, y[train], test_x, y[test], DIGIT_CLASSES,
                   "scikit-learn load_digits", stats)


_IDX_TYPES = {0x08: numpy.uint8}


def read_idx(path, kind):
    """Read one IDX file (gzipped or not). kind 'images' needs 3 dims, 'labels' 1."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an IDX file") from None
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot be read or decompressed ({e}); the file is damaged") \
            from None
    want_dims = 3 if kind == "images" else 1
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code not in _IDX_TYPES or ndim != want_dims:
        raise DataError(f"{path}: magic number 0x{raw[:4].hex()} is not that of IDX {kind} "
                        f"(needs unsigned bytes and {want_dims} dimension(s), "
                        f"0x0000080{want_dims})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated inside its header")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(numpy.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: header declares shape {tuple(dims)} = {expected} bytes in all, "
                        f"but the file has {len(raw)} bytes ("
                        f"{'truncated' if len(raw) < expected else 'trailing data'})")
    return numpy.frombuffer(raw, dtype=numpy.uint8, offset=header).reshape(dims)


def find_idx_files(name, data_dir=None, keys=tuple(IDX_FILES)):
    """Paths of the IDX files (by default all four) of a dataset under data_dir (or its default)."""
    spec = DATASETS[name]
    base = pathlib.Path(data_dir or spec.default_dir)
    if not base.is_dir():
        raise DataError(f"{name}: data directory {base} does not exist; {spec.how_to_get}")
    found = {}
    for key, stem in ((k, IDX_FILES[k]) for k in keys):
        for sub in spec.subdirs:
            for suffix in ("", ".gz"):
                candidate = base / sub / (stem + suffix)
                if candidate.is_file():
                    found[key] = candidate
                    break
            if key in found:
                break
        if key not in found:
            raise DataError(f"{name}: {stem}[.gz] not found under {base} (looked in "
                            f"{', '.join(str(base / s) or str(base) for s in spec.subdirs)}); "
                            f"{spec.how_to_get}")
    return found


def load_idx_dataset(name, data_dir=None, stats=None, splits=("train", "test")):
    """MNIST or Fashion-MNIST from IDX files; every file is validated and must hold
    at least one image. With splits=("test",) and a checkpoint's stats only the
    two test files are read (the training split is then empty)."""
    keys = [f"{s}_{v}" for s in splits for v in "xy"]
    paths = find_idx_files(name, data_dir, keys)
    arrays = {k: read_idx(p, "images" if k.endswith("x") else "labels") for k, p in paths.items()}
    for split in splits:
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if len(x) != len(y):
            raise DataError(f"{paths[split + '_x']} holds {len(x)} images but "
                            f"{paths[split + '_y']} holds {len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{paths[split + '_x']} holds no images; the {split} set needs at "
                            "least one")
        if y.size and y.max() > 9:
            raise DataError(f"{paths[split + '_y']}: label {int(y.max())} is out of range 0..9")
    if len(splits) == 2 and arrays["train_x"].shape[1:] != arrays["test_x"].shape[1:]:
        raise DataError(f"train images are {arrays['train_x'].shape[1:]} but test images are "
                        f"{arrays['test_x'].shape[1:]}")
    if stats is None and "train" not in splits:
        raise ValueError("reading only the test files needs the training set's stats")
    test = arrays["test_x"][:, None] / 255.0
    train = arrays["train_x"][:, None] / 255.0 if "train" in splits else test[:0]
    train_y = arrays["train_y"] if "train" in splits else arrays["test_y"][:0]
    train_x, test_x, stats = standardise(train, test, stats)
    return Dataset(name, train_x, train_y.astype(numpy.int64), test_x,
                   arrays["test_y"].astype(numpy.int64), DATASETS[name].classes,
                   str(paths[keys[0]].parent), stats)


def _load_digits(name, data_dir, seed, stats, splits):
    return load_digits(seed, stats=stats)  # bundled: no files, both splits from one set


def _load_idx(name, data_dir, seed, stats, splits):
    return load_idx_dataset(name, data_dir, stats, splits)


def _load_cifar(name, data_dir, seed, stats, splits):
    spec = DATASETS[name]
    return cifar.load_cifar(name, data_dir or spec.default_dir, stats, splits, spec.how_to_get)


def _load_folder(name, data_dir, seed, stats, splits, **options):
    return imagefolder.load_folder(data_dir, seed, stats, splits, **options)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset gpucnn trains on, said once.

    loader(name, data_dir, seed, stats, splits): its Dataset (see load, load_test).
    input_shape: (C, H, W) of one image; classes: the class names, in label order.
    defaults: the settings a run takes where the user sets none (model, epochs,
    batch_size, optimizer, lr); a model's recipe overrides them (gpucnn.app.config).
    flip: whether a horizontally flipped image keeps its class (a flipped digit is
    another symbol), i.e. whether a recipe's flip augmentation applies.
    default_dir, subdirs, how_to_get (IDX datasets): the folder read without
    --data-dir, the folders under a data folder where the files may lie (where
    torchvision and the original archives leave them), how to get the files.
    options: the Config fields its loader takes as keywords (the folder dataset's
    val_split, channels, image_size); other datasets refuse them.
    needs_data_dir: there is no default folder; --data-dir is required.
    """
    name: str
    help: str
    loader: object
    input_shape: tuple
    classes: tuple
    defaults: types.MappingProxyType
    flip: bool
    default_dir: str = None
    subdirs: tuple = ("",)
    how_to_get: str = ""
    options: tuple = ()
    needs_data_dir: bool = False

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def reads_files(self):
        return bool(self.default_dir) or self.needs_data_dir

    def load(self, data_dir=None, seed=0, stats=None, splits=("train", "test"), options=None):
        return self.loader(self.name, data_dir, seed, stats, splits, **(options or {}))


def _defaults(**settings):
    return types.MappingProxyType(settings)


_CIFAR_DEFAULTS = _defaults(model="resnet", epochs=10, batch_size=128, optimizer="sgd", lr=0.1)

# Each dataset's defaults are what reaches the README's accuracy targets.
DATASETS = {spec.name: spec for spec in (
    DatasetSpec("digits", "scikit-learn's 1,797 8x8 digits (bundled)", _load_digits, (1, 8, 8),
                DIGIT_CLASSES, _defaults(model="digits", epochs=20, batch_size=32,
                                         optimizer="adam", lr=2e-3), flip=False),
    DatasetSpec("fashion-mnist", "Zalando's 28x28 clothing images (IDX files)", _load_idx,
                (1, 28, 28), FASHION_CLASSES, _defaults(model="lenet", epochs=3, batch_size=64,
                                                        optimizer="adam", lr=1e-3), flip=True,
                default_dir="/usr/share/datasets/fashion-mnist",
                subdirs=("", "raw", "FashionMNIST/raw", "fashion-mnist"),
                how_to_get="install Debian's package (apt-get install dataset-fashion-mnist) or "
                "pass --data-dir DIR with the four Fashion-MNIST IDX files"),
    DatasetSpec("mnist", "28x28 handwritten digits (IDX files)", _load_idx, (1, 28, 28),
                DIGIT_CLASSES, _defaults(model="lenet", epochs=3, batch_size=64,
                                         optimizer="adam", lr=1e-3), flip=False,
                default_dir="/usr/share/datasets/mnist", subdirs=("", "raw", "MNIST/raw", "mnist"),
                how_to_get="pass --data-dir DIR with the four MNIST IDX files "
                "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                "t10k-labels-idx1-ubyte, gzipped or not)"),
    DatasetSpec("cifar10", "32x32 colour images of 10 classes (CIFAR-10 python or binary files)",
                _load_cifar, (3, 32, 32), CIFAR10_CLASSES, _CIFAR_DEFAULTS,
                flip=True, default_dir="/usr/share/datasets/cifar10",
                how_to_get="pass --data-dir DIR with cifar-10-batches-py/ or "
                "cifar-10-batches-bin/ (or their files) from "
                "https://www.cs.toronto.edu/~kriz/cifar.html"),
    DatasetSpec("cifar100", "32x32 colour images of 100 classes (CIFAR-100 python or binary "
                "files)", _load_cifar, (3, 32, 32), CIFAR100_CLASSES,
                _CIFAR_DEFAULTS, flip=True, default_dir="/usr/share/datasets/cifar100",
                how_to_get="pass --data-dir DIR with cifar-100-python/ or cifar-100-binary/ "
                "(or their files) from https://www.cs.toronto.edu/~kriz/cifar.html"),
    DatasetSpec("folder", "your own images in --data-dir: one subfolder per class (PNG, JPEG, "
                "...), with train/ and test/ (or val/) subfolders or split by --val-split",
                _load_folder, (None, None, None), (), _defaults(model="lenet", epochs=10,
                                                                batch_size=32, optimizer="adam",
                                                                lr=1e-3), flip=True,
                options=("val_split", "channels", "image_size", "progress"),
                needs_data_dir=True),
)}


def dataset(name):
    """The DatasetSpec of a name; a ValueError names the known ones."""
    return DATASETS[choice(name, "dataset", DATASETS)]


def load(name, data_dir=None, seed=0, options=None):
    return dataset(name).load(data_dir, seed, options=options)


def load_test(name, data_dir=None, seed=0, stats=None, options=None):
    """Only the test set, standardised with the given (a checkpoint's) stats; for
    IDX datasets only the two t10k files are read."""
    return dataset(name).load(data_dir, seed, stats, splits=("test",), options=options)


def batches(x, y, batch_size, device, order=None, start=0):
    """Yield (x, y) batches moved to the device once each; `order` is the
    epoch's permutation, or a rank's share of it (None: all samples in order);
    `start` skips the first batches."""
    n = len(y) if order is None else len(order)
    for i in range(start * batch_size, n, batch_size):
        idx = slice(i, i + batch_size) if order is None else order[i:i + batch_size]
        yield backend.to_device(x[idx], device), backend.to_device(y[idx], device)


def num_batches(n, batch_size):
    return -(-n // batch_size)


def write_idx(path, array):
    """Write an IDX file of unsigned bytes (gzipped when path ends in .gz); for tests and users."""
    array = numpy.asarray(array, dtype=numpy.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
    return os.fspath(path)
