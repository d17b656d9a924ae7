"""TensorBoard scalars beside metrics.jsonl (`gpucnn train --tensorboard`).

The epoch rows of a run are written as scalars (train/test loss and accuracy,
images per second) into OUT/tensorboard/ with tensorboardX, a well-kept writer of
TensorBoard's event files (the optional extra gpucnn[tensorboard]). Like
metrics.jsonl the folder is rebuilt from the run's whole history after every
epoch, so that a resumed run (even one cut mid-epoch) shows each epoch once.
"""
import contextlib
import pathlib
import shutil

from ..errors import ConfigError

FOLDER = "tensorboard"
SCALARS = {"loss/train": "train_loss", "loss/test": "test_loss",
           "accuracy/train": "train_accuracy", "accuracy/test": "test_accuracy",
           "images_per_s": "images_per_s"}


def writer_class():
    """tensorboardX's SummaryWriter, or a ConfigError saying how to install it."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"--tensorboard needs the tensorboardX package ({e}); install it "
                          "with pip install 'gpucnn[tensorboard]'") from None
    return SummaryWriter


def write(out, history):
    """OUT/tensorboard/ holding one scalar per SCALARS key and epoch of history, built
    in a fresh folder that then replaces the old one."""
    out = pathlib.Path(out)
    fresh = out / f".{FOLDER}.tmp"
    shutil.rmtree(fresh, ignore_errors=True)
    with contextlib.closing(writer_class()(logdir=str(fresh))) as writer:
        for row in history:
            for tag, key in SCALARS.items():
                if row.get(key) is not None:
                    writer.add_scalar(tag, row[key], row["epoch"])
    shutil.rmtree(out / FOLDER, ignore_errors=True)
    fresh.rename(out / FOLDER)
