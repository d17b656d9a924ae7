"""An image folder as a dataset: one subfolder per class, holding any image Pillow
reads, with train/ and test/ (or val/) subfolders where the user made them and
otherwise a seeded split that keeps each class's share (stratified).

Decoding is the slow part, so it runs once: the resized pixels go to a file in the
user cache (keyed on the files' paths, sizes and modification times and on the
shape they were decoded to), which later runs read back (memory-mapped where the
pixels would take much of the memory) instead of decoding again."""
import collections
import hashlib
import os
import pathlib

import numpy

from .dataset import DataError, Dataset, channel_stats, standardise_channels

DEFAULT_VAL_SPLIT = 0.2
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}
CACHE_VERSION = b"imagefolder-1"
# A cache bigger than this share of the memory is memory-mapped instead of read in.
IN_MEMORY_SHARE = 0.25


def _files(folder):
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _class_folders(folder):
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(root):
    """(classes, {split: [(path, label)]}, split_given): train and test lists from
    train/ and test/ (or val/) where they exist, else everything as 'all'."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"folder: data directory {root} does not exist; pass --data-dir PATH "
                        "with one subfolder of images per class")
    train_dir = root / "train"
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    top = train_dir if train_dir.is_dir() else root
    classes = tuple(p.name for p in _class_folders(top))
    if not classes:
        raise DataError(f"folder: {top} has no subfolders; it needs one subfolder of images "
                        "per class")
    listing = {"all": [(f, i) for i, c in enumerate(classes) for f in _files(top / c)]}
    if train_dir.is_dir() and test_dir is not None:
        found = tuple(p.name for p in _class_folders(test_dir))
        missing = [c for c in classes if c not in found]
        extra = [c for c in found if c not in classes]
        if missing or extra:
            raise DataError(f"folder: {test_dir} does not hold the classes of {train_dir}: "
                            + "; ".join(filter(None, [
                                missing and f"missing {', '.join(missing)}",
                                extra and f"not in train/: {', '.join(extra)}"])))
        return classes, dict(train=listing["all"], test=[
            (f, i) for i, c in enumerate(classes) for f in _files(test_dir / c)]), True
    return classes, listing, False


def _probe(items):
    """(readable items, their (mode, (W, H)), the names of unreadable files): Pillow
    reads only the headers here."""
    from PIL import Image, UnidentifiedImageError
    kept, info, bad = [], [], []
    for path, label in items:
        try:
            with Image.open(path) as im:
                info.append((im.mode, im.size))
            kept.append((path, label))
        except (UnidentifiedImageError, OSError, ValueError):
            bad.append(path)
    return kept, info, bad


def parse_size(text):
    """'N' or 'HxW' as (H, W), for --image-size; None where unset."""
    if text is None:
        return None
    parts = str(text).lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return (int(parts[0]),) * 2 if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    raise ValueError(f"image_size must be N or HxW in pixels (e.g. 32 or 48x64), got {text!r}")


def _cache_path(items, shape):
    digest = hashlib.sha256(CACHE_VERSION + repr(shape).encode())
    for path, label in items:
        st = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n"
                      .encode())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "gpucnn" / "folders" / f"{digest.hexdigest()[:32]}.npy"


def _decode(items, shape, progress):
    """uint8 pixels (N, C, H, W) of the items, resized (area average when shrinking)."""
    from PIL import Image
    from tqdm import tqdm
    C, H, W = shape
    out = numpy.empty((len(items), C, H, W), numpy.uint8)
    for n, (path, _) in enumerate(tqdm(items, desc="decoding images", unit="image",
                                       disable=None if progress else True, leave=False)):
        try:
            with Image.open(path) as im:
                im = im.convert("L" if C == 1 else "RGB")
        except (OSError, ValueError) as e:  # a header that reads but a body that does not
            raise DataError(f"{path}: its header reads but its pixels do not ({e}); remove or "
                            "replace the file") from None
        shrink = im.width >= W and im.height >= H
        im = im.resize((W, H), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
        pixels = numpy.asarray(im)
        out[n] = pixels[None] if C == 1 else pixels.transpose(2, 0, 1)
    return out


def pixels(items, shape, progress=True):
    """The items' pixels from the cache, decoding them into it first where it lacks them."""
    path = _cache_path(items, shape)
    if not path.is_file():
        array = _decode(items, shape, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            numpy.save(f, array)
        os.replace(tmp, path)
        return array
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    big = total and path.stat().st_size > IN_MEMORY_SHARE * total
    return numpy.load(path, mmap_mode="r" if big else None, allow_pickle=False)


def _split(items, val_split, seed, classes):
    """Seeded, stratified: each class gives round(n * val_split) images (at least one)
    to the test split and keeps at least one for training."""
    labels = numpy.array([label for _, label in items])
    rng = numpy.random.default_rng(seed)
    test = []
    for label in range(len(classes)):
        members = numpy.flatnonzero(labels == label)
        if len(members) < 2:
            raise DataError(f"folder: class {classes[label]!r} has {len(members)} image(s); "
                            "splitting off a test set needs at least 2 per class (or give "
                            "train/ and test/ subfolders)")
        n_test = min(len(members) - 1, max(1, int(round(len(members) * val_split))))
        test.append(rng.permutation(members)[:n_test])
    is_test = numpy.zeros(len(items), bool)
    is_test[numpy.concatenate(test)] = True
    return ([it for it, t in zip(items, is_test) if not t],
            [it for it, t in zip(items, is_test) if t])


def _shape(info, channels, image_size):
    """(C, H, W): the options where given, else by the data (RGB if any image has
    colour; the most common size)."""
    C = channels or (1 if all(mode in GRAY_MODES for mode, _ in info) else 3)
    if image_size is not None:
        H, W = parse_size(image_size)
    else:
        (W, H), _ = collections.Counter(size for _, size in info).most_common(1)[0]
    return int(C), int(H), int(W)


def _check_classes(classes, lists, root):
    for split, items in lists.items():
        counts = numpy.bincount([label for _, label in items], minlength=len(classes))
        empty = [classes[i] for i in numpy.flatnonzero(counts == 0)]
        if empty:
            where = "" if split == "all" else f" in the {split} split"
            raise DataError(f"folder: {root}: class(es) {', '.join(empty)} have no readable "
                            f"images{where}; every class needs at least one")


def load_folder(data_dir, seed=0, stats=None, splits=("train", "test"), val_split=None,
                channels=None, image_size=None, progress=True):
    """The Dataset of an image folder (see the module's docstring); with a
    checkpoint's stats and splits=("test",) only the test images are decoded."""
    classes, lists, given = scan(data_dir)
    warnings = []
    kept, info, bad = {}, [], []
    for split, items in lists.items():
        kept[split], split_info, split_bad = _probe(items)
        info += split_info
        bad += split_bad
    if bad:
        warnings.append(f"gpucnn: warning: skipped {len(bad)} file(s) that Pillow cannot read "
                        f"as images: {', '.join(str(p) for p in bad[:10])}"
                        f"{' ...' if len(bad) > 10 else ''}")
    if not given:
        _check_classes(classes, kept, data_dir)
        kept = dict(zip(("train", "test"), _split(kept["all"], DEFAULT_VAL_SPLIT if val_split
                                                  is None else val_split, seed, classes)))
    _check_classes(classes, kept, data_dir)
    shape = _shape(info, channels, image_size)
    arrays = {s: pixels(kept[s], shape, progress) for s in splits}
    labels = {s: numpy.array([label for _, label in kept[s]], numpy.int64) for s in splits}
    if stats is None:
        if "train" not in splits:
            raise ValueError("reading only the test images needs the training set's stats")
        stats = channel_stats(arrays["train"])
    if "train" not in splits:
        arrays["train"], labels["train"] = arrays["test"][:0], labels["test"][:0]
    return Dataset("folder", standardise_channels(arrays["train"], stats), labels["train"],
                   standardise_channels(arrays["test"], stats), labels["test"], classes,
                   str(data_dir), stats, tuple(warnings))
