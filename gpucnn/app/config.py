"""A training run's settings: `Config` (the fields of ``gpucnn train``), the
defaults per dataset and the recipe per built-in model, the checks, what a resume
keeps from its checkpoint, and the optimizer, schedule and augmentation a config
asks for."""
import dataclasses
import math
import numbers
import pathlib

from . import checkpoint
from ..augment import Augment
from ..errors import ConfigError
from .models import MODELS
from ..optim import SGD, Adam
from ..schedules import SCHEDULES

DEFAULTS = {  # per dataset: what reaches the README's accuracy targets
    "digits": dict(model="digits", epochs=20, batch_size=32, optimizer="adam", lr=2e-3),
    "fashion-mnist": dict(model="lenet", epochs=3, batch_size=64, optimizer="adam", lr=1e-3),
    "mnist": dict(model="lenet", epochs=3, batch_size=64, optimizer="adam", lr=1e-3),
}
# Per built-in model, its recipe (issue 11's ResNet recipe); it overrides the
# dataset's defaults, and whatever the user sets overrides both.
MODEL_DEFAULTS = {
    "resnet": dict(epochs=10, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9,
                   nesterov=True, weight_decay=5e-4, schedule="cosine", augment="crop+flip"),
}
# Unset after both: plain training.
FALLBACKS = dict(nesterov=False, weight_decay=0.0, schedule="none", augment="none",
                 label_smoothing=0.0, warmup=0)
AUGMENTS = ("none", "crop", "flip", "crop+flip")
CROP_PADDING = 2
NO_FLIP = ("digits", "mnist")  # a flipped digit is another symbol
# Settings that define a run: a resumed run takes them from its checkpoint.
RUN_KEYS = ("dataset", "model", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
            "seed", "limit", "nesterov", "schedule", "augment", "label_smoothing", "warmup")


# Unset (None) fields take these, then the dataset's DEFAULTS. A run-defining
# field must default to None, so that a resume can tell "not given" (keep the
# checkpoint's) from "given" (must match the checkpoint's).
GENERAL_DEFAULTS = dict(dataset="digits", momentum=0.9, weight_decay=0.0, seed=0)


@dataclasses.dataclass
class Config:
    """A training run's settings; None means the default (the checkpoint's on a resume).

    out: the run folder; None gives a new runs/<date-time>[-N], or on a resume the
    checkpoint's folder. A folder that already holds a run is refused unless it is
    the resumed run's own or overwrite=True (its run files are removed first).
    epochs: the total; on a resume more than the checkpoint's extends the run.
    progress: a progress bar; None shows one only when stderr is a terminal.
    """
    dataset: str = None
    data_dir: str = None
    model: str = None
    epochs: int = None
    batch_size: int = None
    optimizer: str = None
    lr: float = None
    momentum: float = None
    weight_decay: float = None
    nesterov: bool = None
    schedule: str = None
    augment: str = None
    label_smoothing: float = None
    warmup: int = None
    device: str = None
    seed: int = None
    out: str = None
    resume: str = None
    limit: int = None
    progress: bool = None
    overwrite: bool = False
    cuda_graph: bool = None  # None: on where the device is cuda (gpucnn.graph)

    def filled(self):
        """A copy with the defaults in place of unset fields, checked."""
        c = dataclasses.replace(self, **{k: v for k, v in GENERAL_DEFAULTS.items()
                                        if getattr(self, k) is None})
        if c.dataset not in DEFAULTS:
            raise ConfigError(f"dataset must be one of {tuple(DEFAULTS)}, got {c.dataset!r}")
        c = dataclasses.replace(c, **{k: v for k, v in DEFAULTS[c.dataset].items()
                                     if getattr(c, k) is None})
        c = _fill_recipe(c, self)
        for name in ("epochs", "batch_size"):
            if not is_int(getattr(c, name)) or getattr(c, name) < 1:
                raise ConfigError(f"{name} must be a positive int, got {getattr(c, name)!r}")
        if c.limit is not None and (not is_int(c.limit) or c.limit < 1):
            raise ConfigError(f"limit must be a positive number of samples, got {c.limit!r}")
        if not is_int(c.seed) or c.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {c.seed!r}")
        if c.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {c.optimizer!r}")
        if c.model not in MODELS:
            raise ConfigError(f"model must be one of {tuple(MODELS)}, got {c.model!r}")
        if not (is_real(c.lr) and c.lr > 0 and math.isfinite(c.lr)):
            raise ConfigError(f"lr must be a positive number, got {c.lr!r}")
        if not (is_real(c.momentum) and 0 <= c.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {c.momentum!r} (SGD diverges "
                              "from 1 on)")
        if not (is_real(c.weight_decay) and 0 <= c.weight_decay < math.inf):
            raise ConfigError(f"weight_decay must be a number >= 0, got {c.weight_decay!r}")
        return c


def is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fill_recipe(c, given):
    """The model's recipe, then FALLBACKS, in place of the fields the user left unset
    (the dataset's defaults give way to the recipe); checks the new settings."""
    recipe = dict(MODEL_DEFAULTS.get(c.model, {}))
    if recipe.get("augment") == "crop+flip" and c.dataset in NO_FLIP:
        recipe["augment"] = "crop"
    fields = {k: v for k, v in recipe.items() if getattr(given, k) is None}
    fields.update({k: v for k, v in FALLBACKS.items()
                   if getattr(given, k) is None and k not in recipe})
    c = dataclasses.replace(c, **fields)
    if c.schedule not in ("none",) + tuple(SCHEDULES):
        raise ConfigError(f"schedule must be one of {('none',) + tuple(SCHEDULES)}, "
                          f"got {c.schedule!r}")
    if c.augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {AUGMENTS}, got {c.augment!r}")
    if not (is_real(c.label_smoothing) and 0 <= c.label_smoothing <= 1):
        raise ConfigError(f"label_smoothing must be in [0, 1], got {c.label_smoothing}")
    if not is_int(c.warmup) or c.warmup < 0:
        raise ConfigError(f"warmup must be a number of steps >= 0, got {c.warmup!r}")
    if c.nesterov and c.optimizer != "sgd":
        raise ConfigError(f"nesterov applies to --optimizer sgd, got {c.optimizer!r}")
    return c


def make_schedule(config, optimizer, steps_per_epoch):
    """The config's lr schedule, stepped once per batch (None for 'none').
    cosine: from lr to 0 over all the run's batches after the warmup; step: x0.1
    every third of the run (at least every epoch)."""
    if config.schedule == "none":
        if config.warmup:
            return SCHEDULES["step"](optimizer, step_size=2**62, gamma=1.0,
                                     warmup_steps=config.warmup)
        return None
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return SCHEDULES["cosine"](optimizer, T_max=max(1, total - config.warmup), eta_min=0.0,
                                   warmup_steps=config.warmup)
    return SCHEDULES["step"](optimizer, step_size=max(1, config.epochs // 3) * steps_per_epoch,
                             gamma=0.1, warmup_steps=config.warmup)


def make_augment(config, stats, seed):
    """The batch transform of --augment; pads with the standardised value of a black pixel."""
    if config.augment == "none":
        return None
    fill = (0.0 - stats["mean"]) / stats["std"] if stats else 0.0
    return Augment(padding=CROP_PADDING if "crop" in config.augment else 0,
                   flip="flip" in config.augment, fill=fill, seed=seed)


def make_optimizer(config, params):
    if config.optimizer == "sgd":
        return SGD(params, lr=config.lr, momentum=config.momentum,
                   weight_decay=config.weight_decay, nesterov=bool(config.nesterov))
    return Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def merge_resume(config, meta):
    """The checkpoint's run settings, with a clear error where the config sets one
    differently. Unset epochs are the checkpoint's, more extend the run; an unset
    out is the checkpoint's folder."""
    saved = meta.get("config")
    if not isinstance(saved, dict) or any(k not in saved for k in RUN_KEYS + ("epochs",)):
        raise checkpoint.CheckpointError(f"{config.resume} was not written by gpucnn train "
                                         "(its run settings are missing)")
    clashes = [k for k in RUN_KEYS if getattr(config, k) is not None and getattr(config, k) !=
               saved[k]]
    if clashes:
        raise ConfigError("--resume continues the checkpoint's run, but these settings differ "
                          "from it: " + ", ".join(f"{k}={getattr(config, k)!r} (checkpoint: "
                                                  f"{saved[k]!r})" for k in clashes))
    done = meta.get("epoch", 0)
    if config.epochs is not None and config.epochs < done:
        raise ConfigError(f"--epochs {config.epochs} is fewer than the {done} epochs "
                          f"{config.resume} has finished; pass more than {done} to extend it")
    keep = {k: saved[k] for k in RUN_KEYS}
    if config.epochs is None:
        keep["epochs"] = max(saved["epochs"], done)
    if config.out is None:
        keep["out"] = str(pathlib.Path(config.resume).parent)
    return dataclasses.replace(config, **keep)
