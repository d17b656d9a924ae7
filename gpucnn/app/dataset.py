"""What every dataset loader gives and shares: the Dataset record (float32 images,
int64 labels, class names, normalisation statistics), DataError for a bad data
file or folder, and the normalisation (one mean and std, or one per channel,
taken from the training split)."""
from dataclasses import dataclass, field

import numpy

from ..errors import UserError


class DataError(UserError, ValueError):
    """A data file is missing, truncated or corrupt; the message says which and why."""


@dataclass
class Dataset:
    name: str
    train_x: numpy.ndarray
    train_y: numpy.ndarray
    test_x: numpy.ndarray
    test_y: numpy.ndarray
    classes: tuple
    source: str = ""
    stats: dict = field(default_factory=dict)
    warnings: tuple = ()  # lines for the log, e.g. the files a folder had that are not images

    @property
    def image_shape(self):
        return self.train_x.shape[1:]


def standardise(train, test, stats=None):
    """Both sets scaled by the training set's mean and std (or by the given stats,
    e.g. a checkpoint's, so that evaluation sees what training saw)."""
    if stats is None:
        stats = dict(mean=float(train.mean()), std=float(train.std()))
    mean, std = stats["mean"], stats["std"]
    return ((train - mean) / std).astype(numpy.float32), ((test - mean) / std).astype(
        numpy.float32), dict(mean=mean, std=std)


def channel_stats(images):
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1], as
    lists (a checkpoint stores them as JSON)."""
    x = images.reshape(len(images), images.shape[1], -1)
    mean = x.mean(axis=(0, 2), dtype=numpy.float64) / 255.0
    square = numpy.einsum("ncp,ncp->c", x, x, dtype=numpy.float64) / (x.shape[0] * x.shape[2])
    std = numpy.sqrt(numpy.maximum(square / 255.0 ** 2 - mean ** 2, 0.0))
    # A channel with one value everywhere (no blue in any image, say) is only shifted.
    std[std == 0] = 1.0
    return dict(mean=mean.tolist(), std=std.tolist())


def stats_arrays(stats, ndim=4):
    """mean and std shaped to broadcast over (N, C, H, W) (scalars stay scalars)."""
    mean, std = (numpy.asarray(stats[k], dtype=numpy.float64) for k in ("mean", "std"))
    if mean.ndim:
        shape = (-1,) + (1,) * (ndim - 2)
        mean, std = mean.reshape(shape), std.reshape(shape)
    return mean, std


def standardise_channels(images, stats):
    """uint8 images (N, C, H, W) as float32 scaled to [0, 1] then by per-channel stats;
    in float32 throughout (CIFAR's training set is 1.2 GB in float64)."""
    mean, std = stats_arrays(stats)
    scale = (1.0 / (255.0 * std)).astype(numpy.float32)
    shift = (mean / std).astype(numpy.float32)
    return images.astype(numpy.float32) * scale - shift
