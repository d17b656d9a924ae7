"""CIFAR-10 and CIFAR-100 from the files users already have: the python-pickle
layouts (cifar-10-batches-py/, cifar-100-python/) and the binary ones
(cifar-10-batches-bin/, cifar-100-binary/). Nothing is downloaded.

The pickles are read by an Unpickler that builds only what the real files hold
(dicts of bytes, lists of ints and numpy uint8 arrays): loading a pickle may
otherwise run any code its author chose, and a data folder is not trusted."""
import pathlib
import pickle

import numpy

from .dataset import DataError, Dataset, channel_stats, standardise_channels

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR100_CLASSES = tuple(
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain "
    "mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain "
    "plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone "
    "television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf "
    "woman worm".split())

PIXELS = 3 * 32 * 32
# Per dataset: the folder each layout unpacks to, and per split its files.
LAYOUTS = {
    "cifar10": (("py", "cifar-10-batches-py",
                 dict(train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",),
                      meta="batches.meta")),
                ("bin", "cifar-10-batches-bin",
                 dict(train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                      test=("test_batch.bin",), meta="batches.meta.txt"))),
    "cifar100": (("py", "cifar-100-python", dict(train=("train",), test=("test",), meta="meta")),
                 ("bin", "cifar-100-binary",
                  dict(train=("train.bin",), test=("test.bin",), meta="fine_label_names.txt"))),
}
STANDARD_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}


def _latin1_encode(text, encoding="latin1"):
    """What protocol-2 pickles written by Python 3 call to rebuild bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is "
                                     "not how a CIFAR file stores bytes")
    return text.encode("latin1")


def _allowed():
    """The globals a CIFAR pickle names: numpy's array reconstruction and dtype
    (under numpy 1's and 2's module names) and the bytes helper; nothing else."""
    multiarray = numpy._core.multiarray if hasattr(numpy, "_core") else numpy.core.multiarray
    found = {("numpy", "ndarray"): numpy.ndarray, ("numpy", "dtype"): numpy.dtype,
             ("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[(module, "_reconstruct")] = multiarray._reconstruct
    return found


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        target = _allowed().get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never "
                                         "does (only numpy arrays, lists and bytes are read)")
        return target


def read_pickle(path):
    """One CIFAR python-layout file: its dict, keys as bytes (the files were written
    by Python 2), or a DataError naming the file."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError) as e:
        raise DataError(f"{path}: not a CIFAR python batch file ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}; a CIFAR python file holds a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _pickle_batch(path, label_key):
    d = read_pickle(path)
    missing = [k for k in ("data", label_key) if k not in d]
    if missing:
        raise DataError(f"{path}: has no {' or '.join(repr(k) for k in missing)} entry (keys: "
                        f"{', '.join(map(str, d)) or 'none'}); it is not a CIFAR batch file")
    x = d["data"]
    if not isinstance(x, numpy.ndarray) or x.dtype != numpy.uint8 or x.ndim != 2 or \
            x.shape[1] != PIXELS:
        raise DataError(f"{path}: 'data' is {getattr(x, 'dtype', type(x).__name__)} of shape "
                        f"{getattr(x, 'shape', '?')}; CIFAR needs uint8 of shape (N, {PIXELS})")
    try:
        y = numpy.asarray(d[label_key], dtype=numpy.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {label_key!r} is not a list of integer labels") from None
    if y.shape != (len(x),):
        raise DataError(f"{path}: {len(x)} images but {y.size} {label_key!r}")
    return x, y


def _binary_batch(path, label_bytes):
    """Records of label byte(s) then 3,072 pixel bytes; the last label byte is the class
    (CIFAR-100's fine label follows its coarse one)."""
    record = label_bytes + PIXELS
    try:
        raw = numpy.fromfile(path, dtype=numpy.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    if raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte "
                        f"records ({label_bytes} label byte(s) + {PIXELS} pixels); the file is "
                        "truncated or not this layout")
    rows = raw.reshape(-1, record)
    return rows[:, label_bytes:], rows[:, label_bytes - 1].astype(numpy.int64)


def find_layout(name, base):
    """(kind, folder, files) of the first layout whose first training file exists in
    base or in the folder the archive unpacks to."""
    for kind, sub, files in LAYOUTS[name]:
        for folder in (base / sub, base):
            if (folder / files["train"][0]).is_file() or (folder / files["test"][0]).is_file():
                return kind, folder, files
    return None


def class_names(name, kind, folder, files):
    """The names in the meta file where there is one, else the standard ones."""
    standard = STANDARD_CLASSES[name]
    path = folder / files["meta"]
    if not path.is_file():
        return standard
    if kind == "py":
        names = read_pickle(path).get("label_names" if name == "cifar10" else "fine_label_names")
    else:
        names = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    if not isinstance(names, list) or len(names) != len(standard):
        raise DataError(f"{path}: needs {len(standard)} class names, got "
                        f"{len(names) if isinstance(names, list) else type(names).__name__}")
    return tuple(n.decode("utf-8", "replace").strip() if isinstance(n, bytes) else str(n)
                 for n in names)


def read_split(name, kind, folder, files, split):
    """(uint8 images (N, 3, 32, 32), int64 labels) of one split, its labels checked."""
    parts = []
    for file in files[split]:
        path = folder / file
        if not path.is_file():
            raise DataError(f"{name}: {path} not found; the {split} split needs "
                            f"{', '.join(files[split])} in {folder}")
        if kind == "py":
            parts.append((path, *_pickle_batch(path, "labels" if name == "cifar10" else
                                               "fine_labels")))
        else:
            parts.append((path, *_binary_batch(path, 1 if name == "cifar10" else 2)))
    classes = len(STANDARD_CLASSES[name])
    for path, _, y in parts:
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise DataError(f"{path}: label {int(y.max() if y.max() >= classes else y.min())} "
                            f"is out of range 0..{classes - 1}")
    x = numpy.concatenate([x for _, x, _ in parts])
    if len(x) == 0:
        raise DataError(f"{name}: {', '.join(str(p) for p, _, _ in parts)} hold no images; the "
                        f"{split} set needs at least one")
    return x.reshape(-1, 3, 32, 32), numpy.concatenate([y for _, _, y in parts])


def load_cifar(name, data_dir, stats, splits, how_to_get):
    """The Dataset of cifar10 or cifar100, standardised per channel (with the given
    stats, e.g. a checkpoint's, or the training split's)."""
    base = pathlib.Path(data_dir)
    if not base.is_dir():
        raise DataError(f"{name}: data directory {base} does not exist; {how_to_get}")
    layout = find_layout(name, base)
    if layout is None:
        looked = ", ".join(f"{base / sub}/{files['train'][0]}" for _, sub, files in LAYOUTS[name])
        raise DataError(f"{name}: no CIFAR files under {base} (looked for {looked} and the same "
                        f"names in {base}); {how_to_get}")
    kind, folder, files = layout
    arrays = {split: read_split(name, kind, folder, files, split) for split in splits}
    if stats is None:
        if "train" not in splits:
            raise ValueError("reading only the test files needs the training set's stats")
        stats = channel_stats(arrays["train"][0])
    test_x, test_y = arrays["test"]
    train_x, train_y = arrays["train"] if "train" in splits else (test_x[:0], test_y[:0])
    return Dataset(name, standardise_channels(train_x, stats), train_y,
                   standardise_channels(test_x, stats), test_y,
                   class_names(name, kind, folder, files), str(folder), stats)
