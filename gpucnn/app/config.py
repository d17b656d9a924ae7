"""A training run's settings: `Config`, whose fields each say once what a setting
is (its ``gpucnn train`` option, help, choices and check, and whether it defines
the run); how unset fields are filled (the user's value, else the model's recipe,
else the dataset's defaults, else the field's fallback); what a resume keeps from
its checkpoint; and the optimizer, schedule and augmentation a config asks for."""
import argparse
import dataclasses
import functools
import pathlib

from . import checkpoint, data, tensorboard
from ..augment import Augment
from ..backends.precision import PRECISIONS
from ..errors import ConfigError
from .models import MODELS
from ..optim import SGD, Adam
from ..schedules import SCHEDULES
from ..validate import choice, integer, number, positive_int

DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adam")
SCHEDULE_NAMES = ("none",) + tuple(sorted(SCHEDULES))
AUGMENTS = ("none", "crop", "flip", "crop+flip")
CROP_PADDING = 2
DEFAULT_DATASET = "digits"


def setting(help, *, run=False, check=None, fallback=None, default=None, flag=None, **cli):
    """A Config field together with its ``gpucnn train`` option.

    help: the option's help text. run: the setting defines the run: a resume takes
    it from the checkpoint and refuses a different value. check(value, name): raises
    ConfigError for a bad value (run on the filled-in config, where the value is not
    None); where cli has choices and check is None, the value must be one of them;
    check=False: checked elsewhere. fallback: the value where neither the user, the
    model's recipe nor the dataset's defaults set one. flag: the option's name
    (default --name-with-dashes); cli: further argparse.add_argument keywords
    (choices, metavar, action, ...; type defaults to the field's annotation).
    A run-defining field defaults to None, so that a resume can tell "not given"
    (keep the checkpoint's) from "given" (must match the checkpoint's)."""
    if check is None and "choices" in cli:
        check = _checked(choice, choices=cli["choices"])
    return dataclasses.field(default=default, metadata=dict(
        help=help, run=run, check=check, fallback=fallback, flag=flag, cli=cli))


def _listing(text, registry):
    """An option's help followed by each registered name's own help."""
    return f"{text}: " + "; ".join(f"{name}: {spec.help}" for name, spec in registry.items())


def _checked(check, **keywords):
    return functools.partial(check, error=ConfigError, **keywords)


def _tensorboard(value, name):
    if value:
        tensorboard.writer_class()  # a missing tensorboardX is said before training
    return value


def _momentum(value, name):
    try:
        return number(value, name, 0, 1, high_open=True, what="in [0, 1)", error=ConfigError)
    except ConfigError as e:
        raise ConfigError(f"{e} (SGD diverges from 1 on)") from None


def _image_size(value, name):
    from .imagefolder import parse_size
    try:
        parse_size(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclasses.dataclass
class Config:
    """A training run's settings; None means the default (the checkpoint's on a resume).

    out: the run folder; None gives a new runs/<date-time>[-N], or on a resume the
    checkpoint's folder. A folder that already holds a run is refused unless it is
    the resumed run's own or overwrite=True (its run files are removed first).
    epochs: the total; on a resume more than the checkpoint's extends the run (its
    schedule is then re-planned over the new total).
    progress: a progress bar; None shows one when stderr is a terminal and otherwise
    (a log file) a plain progress line every 30 s.
    cuda_graph: None replays the step from a CUDA graph where the device is cuda.
    batch_size is per rank: under mpiexec -n R a step takes R times as many images.
    """
    dataset: str = setting(_listing(f"what to train on (default {DEFAULT_DATASET})",
                                    data.DATASETS),
                           run=True, fallback=DEFAULT_DATASET, choices=tuple(data.DATASETS))
    data_dir: str = setting("directory with the dataset's files (IDX files for fashion-mnist and "
                            "mnist; the python or binary batches for cifar10 and cifar100; "
                            "one subfolder of images per class for folder)")
    # The folder dataset's options: they define a run (another split, size or channel
    # count is other data); the other datasets refuse them.
    val_split: float = setting("folder: the share of each class held out for testing where "
                               "--data-dir has no train/ and test/ (or val/) subfolders "
                               "(default 0.2; seeded by --seed)", run=True, metavar="F",
                               fallback=0.2,
                               check=_checked(number, low=0, high=1, low_open=True,
                                              high_open=True, what="in (0, 1)"))
    channels: int = setting("folder: 1 (grayscale) or 3 (RGB); default: RGB if any image has "
                            "colour", run=True, choices=(1, 3))
    image_size: str = setting("folder: resize every image to N or HxW pixels (default: the "
                              "most common size)", run=True, metavar="SIZE", check=_image_size)
    model: str = setting(_listing("built-in network (default: lenet for 28x28 images, digits "
                                  "for 8x8)", MODELS), run=True, choices=tuple(MODELS))
    epochs: int = setting("total number of epochs", check=_checked(positive_int))
    batch_size: int = setting("images per training step on each rank (default: the dataset's "
                              "or the model's recipe); under mpiexec -n R the global batch is "
                              "R times this", run=True, check=_checked(positive_int))
    optimizer: str = setting("the optimizer (default: the dataset's or the model's recipe)",
                             run=True, choices=OPTIMIZERS)
    lr: float = setting("learning rate", run=True,
                        check=_checked(number, low=0, low_open=True))
    momentum: float = setting("SGD momentum (default 0.9)", run=True, fallback=0.9,
                              check=_momentum)
    weight_decay: float = setting("L2 weight decay (default 0; resnet 5e-4)", run=True,
                                  fallback=0.0, check=_checked(number, low=0))
    nesterov: bool = setting("Nesterov momentum for SGD", run=True, fallback=False,
                             action=argparse.BooleanOptionalAction)
    schedule: str = setting("learning-rate schedule, stepped per batch: cosine to 0 over the "
                            "run, or step (x0.1 every third of the run); default none",
                            run=True, fallback="none", choices=SCHEDULE_NAMES)
    warmup: int = setting("linear lr warmup over the first STEPS batches (default 0)",
                          run=True, fallback=0, metavar="STEPS",
                          check=_checked(integer, minimum=0, what="a number of steps >= 0"))
    augment: str = setting("on-device augmentation: random crop with padding 2, random "
                           "horizontal flip; default none", run=True, fallback="none",
                           choices=AUGMENTS)
    label_smoothing: float = setting("cross-entropy label smoothing in [0, 1] (default 0)",
                                     run=True, fallback=0.0, metavar="S",
                                     check=_checked(number, low=0, high=1, what="in [0, 1]"))
    # checked when resolved (gpucnn.backend.resolve_device), $GPUCNN_DEVICE too
    device: str = setting("default: $GPUCNN_DEVICE or auto", choices=DEVICES, check=False)
    seed: int = setting("seed for initialisation and shuffling (default 0)", run=True,
                        fallback=0, check=_checked(integer, minimum=0))
    out: str = setting("output directory (default: a new runs/<date-time>); one that already "
                       "holds a run needs --resume or --overwrite")
    overwrite: bool = setting("replace the run already in --out (its run files are removed "
                              "first)", default=False, action="store_true")
    resume: str = setting("continue a run from its checkpoint (its settings are kept)",
                          metavar="CHECKPOINT")
    limit: int = setting("train on the first N samples only", run=True, metavar="N",
                         check=_checked(positive_int, what="a positive number of samples"))
    progress: bool = setting("no progress bar (nor, off a terminal, progress lines)",
                             flag="--no-progress", action="store_const",
                             const=False)
    tensorboard: bool = setting("also write the epoch metrics as TensorBoard scalars in "
                                "OUT/tensorboard/ (needs gpucnn[tensorboard]: tensorboardX)",
                                default=False, action="store_true", check=_tensorboard)
    sync_bn: bool = setting("under mpiexec: BatchNorm normalises with the statistics of the "
                            "global batch, all-reduced across the ranks (default: each rank's "
                            "own batch, as PyTorch DDP; the running statistics are then "
                            "averaged before each evaluation and checkpoint)", run=True,
                            fallback=False, action="store_const", const=True)
    dist_timeout: float = setting("under mpiexec: seconds a rank waits for the others before "
                                  "the run is ended on every rank, naming the rank that did "
                                  "not answer (default 300)", metavar="SECONDS", fallback=300.0,
                                  check=_checked(number, low=0, low_open=True))
    precision: str = setting("float32 convolutions on a GPU: fp32 (FP32 multiply-adds), tf32 "
                             "(tensor cores, 10-bit mantissas: PyTorch's default) or 3xtf32 "
                             "(tensor cores at FP32's accuracy); default tf32, or a resumed "
                             "run's (docs/precision.md). The CPU computes in FP32",
                             choices=PRECISIONS)
    cuda_graph: bool = setting("replay the training step from a CUDA graph (default: on with "
                               "--device cuda; with any optimizer, schedule, warmup, "
                               "augmentation or label smoothing; a model with Dropout runs "
                               "eagerly)", action=argparse.BooleanOptionalAction)

    def filled(self):
        """A copy with the defaults in place of unset fields, checked. An unset field
        takes the model's recipe, else the dataset's defaults, else its fallback."""
        name = FALLBACKS["dataset"] if self.dataset is None else self.dataset
        dataset = data.DATASETS[check_setting("dataset", name)]
        model = self.model if self.model is not None else dataset.defaults["model"]
        recipe = dict(MODELS[model].recipe) if model in MODELS else {}
        if recipe.get("augment") == "crop+flip" and not dataset.flip:
            recipe["augment"] = "crop"
        foreign = [k for k in FOLDER_KEYS if getattr(self, k) is not None
                   and k not in dataset.options]
        if foreign:
            raise ConfigError(f"--{foreign[0].replace('_', '-')} applies to --dataset folder, "
                              f"not {dataset.name}; leave it out")
        fills = {}
        for name in (f.name for f in FIELDS if getattr(self, f.name) is None
                     and (f.name not in FOLDER_KEYS or f.name in dataset.options)):
            source = next((s for s in (recipe, dataset.defaults, FALLBACKS) if name in s), None)
            if source is not None:
                fills[name] = source[name]
        c = dataclasses.replace(self, **fills)
        for f in FIELDS:
            if getattr(c, f.name) is not None:
                check_setting(f.name, getattr(c, f.name))
        if dataset.needs_data_dir and not c.data_dir:
            raise ConfigError(f"--dataset {dataset.name} needs --data-dir PATH (a folder with "
                              "one subfolder of images per class)")
        if c.data_dir and not dataset.reads_files:
            raise ConfigError(f"--data-dir {c.data_dir}: the {dataset.name} dataset is bundled "
                              "and reads no files; leave --data-dir out")
        if c.nesterov and c.optimizer != "sgd":
            raise ConfigError(f"nesterov applies to --optimizer sgd, got {c.optimizer!r}")
        return c


FIELDS = dataclasses.fields(Config)
# Settings only the folder dataset reads; checkpoints from before them lack them.
FOLDER_KEYS = ("val_split", "channels", "image_size")
# Run settings added after the first checkpoints: what those checkpoints' runs did.
LATER_KEYS = {"sync_bn": False}
# Settings that define a run: a resumed run takes them from its checkpoint.
RUN_KEYS = tuple(f.name for f in FIELDS if f.metadata["run"])
# Unset after the model's recipe and the dataset's defaults: plain training.
FALLBACKS = {f.name: f.metadata["fallback"] for f in FIELDS if f.metadata["fallback"] is not None}


def check_setting(name, value):
    """The value, after its field's check (which raises ConfigError)."""
    check = Config.__dataclass_fields__[name].metadata["check"]
    if check:
        check(value, name)
    return value


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


def make_augment(config, stats, seed, rank=0, ranks=1):
    """The batch transform of --augment; pads with the standardised value of a black pixel
    (grayscale stats) or with the mean colour (per-channel stats). rank, ranks: this
    process's share of each global batch under mpiexec."""
    if config.augment == "none":
        return None
    fill = 0.0
    if stats and not isinstance(stats["mean"], list):
        fill = (0.0 - stats["mean"]) / stats["std"]
    # Augment pads every channel with one value; with per-channel stats that is 0,
    # the training set's mean colour, since no single value is black in every channel.
    return Augment(padding=CROP_PADDING if "crop" in config.augment else 0,
                   flip="flip" in config.augment, fill=fill, seed=seed, rank=rank, ranks=ranks)


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
    if isinstance(saved, dict):
        saved = {**dict.fromkeys(FOLDER_KEYS), **LATER_KEYS, **saved}
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
