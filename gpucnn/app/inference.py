"""Inference from a checkpoint: ``gpucnn.load`` (the trained model in one call)
and what ``gpucnn predict`` does with image files (Pillow) and .npy arrays."""
import pathlib

import numpy

from .. import backend
from . import checkpoint, data
from ..errors import UserError
from .models import MODELS


class InputError(UserError, ValueError):
    """An input file for prediction is missing, unreadable or of the wrong shape."""


def from_checkpoint(path, device=None, model=None):
    """(model, meta, device, why): the checkpoint's built-in model (or the given
    one) with its weights, on the resolved device."""
    meta = checkpoint.read(path)[0]
    if model is None:
        if meta.get("custom_model"):
            raise checkpoint.CheckpointError(
                f"{path} holds a model passed in from Python, not a built-in one; rebuild that "
                "model and pass it: gpucnn.load(path, model=net)")
        saved = meta.get("config")
        if not isinstance(saved, dict) or saved.get("model") not in MODELS or \
                "num_classes" not in meta:
            raise checkpoint.CheckpointError(f"{path} was not written by gpucnn train (its run "
                                             "settings are missing)")
        model = build_recorded(meta)
    device, why = backend.resolve_device(device)
    checkpoint.restore(path, model)
    model.to(device)
    return model, meta, device, why


def build_recorded(meta):
    """The checkpoint's built-in model, sized for the image shape it records; a
    checkpoint written before the shape was recorded holds the model's own shape
    (it was never built for another) with its recorded channels."""
    spec = MODELS[meta["config"]["model"]]
    shape = meta.get("input_shape")
    if not shape:
        shape = (meta.get("in_channels", 1),) + tuple(spec.input_shape[1:])
    return spec.build(num_classes=meta["num_classes"], input_shape=tuple(shape))


def load(path, device=None, model=None):
    """The model trained into a checkpoint, in eval mode, ready for inference.

    device: 'cpu', 'cuda', 'auto' or None ($GPUCNN_DEVICE, else auto).
    model: for a checkpoint of a network passed to train() from Python, a fresh
    instance of that network to load the weights into.
    The model gains three attributes: ``classes`` (the class names),
    ``input_shape`` ((C, H, W) of one image) and ``normalization`` (the training
    set's mean and std, to apply as (x - mean) / std before calling it).
    """
    model, meta, _, _ = from_checkpoint(path, device, model)
    model.eval()
    dataset = (meta.get("config") or {}).get("dataset")
    model.classes = tuple(meta.get("classes") or range(meta.get("num_classes", 0)))
    model.input_shape = tuple(meta.get("input_shape") or _dataset_input_shape(dataset))
    model.normalization = dict(meta.get("data_stats") or dict(mean=0.0, std=1.0))
    # The built-in grayscale datasets are light strokes on dark; a user's folder is
    # taken as its images are.
    model.invert_light = dataset != "folder"
    return model


def _dataset_input_shape(name):
    """The dataset's image shape, for checkpoints written before the input shape was
    recorded; () for an unknown dataset."""
    spec = data.DATASETS.get(name)
    return spec.input_shape if spec is not None else ()


def read_image(path, input_shape, invert=True):
    """An image file as a (C, H, W) float array in [0, 1]: grayscale (or RGB for
    3 channels), resized to the model's input; with invert, a grayscale image is
    inverted when its background is light (the built-in grayscale datasets have light
    strokes on a dark background)."""
    from PIL import Image, UnidentifiedImageError
    C, H, W = input_shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if C == 1 else "RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not an image Pillow can read (PNG, JPEG, ...) nor a .npy "
                         f"array ({e})") from None
    pixels = numpy.asarray(im, dtype=numpy.float64) / 255.0
    border = numpy.concatenate([pixels[0].ravel(), pixels[-1].ravel(), pixels[:, 0].ravel(),
                                pixels[:, -1].ravel()])
    # Only the grayscale datasets are drawn light on dark; a photo keeps its colours.
    if invert and C == 1 and numpy.median(border) > 0.5:
        pixels = 1.0 - pixels
    image = Image.fromarray(numpy.round(pixels * 255).astype(numpy.uint8))
    # shrinking: each pixel the mean of the area it covers (no ringing at strokes' edges)
    shrink = image.width >= W and image.height >= H
    resized = image.resize((W, H), Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC)
    out = numpy.asarray(resized, dtype=numpy.float64) / 255.0
    return out[None] if C == 1 else out.transpose(2, 0, 1)


def read_array(path, input_shape):
    """A .npy file as (N, C, H, W) floats in [0, 1]: uint8 pixels are divided by
    255; float arrays are taken as they are. Shapes (H, W), (C, H, W), (N, H, W)
    (one channel) and (N, C, H, W) are accepted."""
    try:
        a = numpy.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy array of numbers ({e})") from None
    if a.dtype == numpy.uint8:
        a = a / 255.0
    elif a.dtype.kind != "f":
        raise InputError(f"{path}: holds {a.dtype} values; predict needs uint8 pixels "
                         "(0..255) or floats in [0, 1]")
    shape = tuple(input_shape)
    if a.shape == shape[1:]:
        a = a[None, None]
    elif a.shape == shape or (a.ndim == 3 and shape[0] == 1 and a.shape[1:] == shape[1:]):
        a = a[None] if a.shape == shape else a[:, None]
    elif not (a.ndim == 4 and a.shape[1:] == shape):
        raise InputError(f"{path}: array of shape {a.shape} does not fit the model's input "
                         f"{shape} (give (H, W), (C, H, W), (N, H, W) or (N, C, H, W))")
    if not numpy.isfinite(a).all():
        raise InputError(f"{path}: holds NaN or infinite values")
    return a.astype(numpy.float64)


def read_inputs(paths, input_shape, invert=True):
    """[(label, (C, H, W) array)] for image files and .npy arrays (invert: see read_image)."""
    items = []
    for path in paths:
        if pathlib.Path(path).suffix.lower() == ".npy":
            batch = read_array(path, input_shape)
            items += [(f"{path}[{i}]" if len(batch) > 1 else str(path), x)
                      for i, x in enumerate(batch)]
        else:
            items.append((str(path), read_image(path, input_shape, invert)))
    return items


def probabilities(model, images, batch_size=256):
    """Softmax class probabilities (N, classes) on the host for (N, C, H, W)
    images in [0, 1], standardised with the model's normalization first."""
    mean, std = data.stats_arrays(model.normalization)
    x = ((numpy.asarray(images) - mean) / std).astype(numpy.float32)
    device = model.device
    rows = []
    for i in range(0, len(x), batch_size):
        logits = backend.to_numpy(model.forward(backend.to_device(x[i:i + batch_size], device)))
        z = logits.astype(numpy.float64) - logits.max(axis=1, keepdims=True)
        p = numpy.exp(z)
        rows.append(p / p.sum(axis=1, keepdims=True))
    return numpy.concatenate(rows) if rows else numpy.zeros((0, len(model.classes)))


def top_classes(probs, classes, k):
    """Per row, the k most probable (class name, class index, probability), best first
    (ties in class order)."""
    order = numpy.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(classes[j], int(j), float(p[j])) for j in row] for p, row in zip(probs, order)]
