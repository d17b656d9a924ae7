"""The training loop behind ``gpucnn train``: progress, metrics, checkpoints,
resume, plots, and a clean stop on NaN/inf or Ctrl-C."""
import dataclasses
import json
import math
import os
import pathlib
import time

import numpy

from . import backend, checkpoint, data, plots
from . import functional as F
from .models import MODELS
from .optim import SGD, Adam
from .random import manual_seed
from .step import check_labels, train_step

DEFAULTS = {  # per dataset: what reaches the README's accuracy targets
    "digits": dict(model="digits", epochs=20, batch_size=32, optimizer="adam", lr=2e-3),
    "fashion-mnist": dict(model="lenet", epochs=3, batch_size=64, optimizer="adam", lr=1e-3),
    "mnist": dict(model="lenet", epochs=3, batch_size=64, optimizer="adam", lr=1e-3),
}
# Settings that define a run: a resumed run takes them from its checkpoint.
RUN_KEYS = ("dataset", "model", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
            "seed", "limit")


@dataclasses.dataclass
class Config:
    dataset: str = "digits"
    data_dir: str = None
    model: str = None
    epochs: int = None
    batch_size: int = None
    optimizer: str = None
    lr: float = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    device: str = None
    seed: int = 0
    out: str = "runs/latest"
    resume: str = None
    limit: int = None
    progress: bool = True
    cuda_graph: bool = None  # None: on where the device is cuda (gpucnn.graph)

    def filled(self):
        """A copy with the dataset's defaults in place of unset fields, checked."""
        if self.dataset not in DEFAULTS:
            raise ValueError(f"dataset must be one of {tuple(DEFAULTS)}, got {self.dataset!r}")
        c = dataclasses.replace(self, **{k: v for k, v in DEFAULTS[self.dataset].items()
                                        if getattr(self, k) is None})
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(c, name)!r}")
        if c.limit is not None and c.limit < 1:
            raise ValueError(f"limit must be a positive number of samples, got {c.limit}")
        if c.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {c.optimizer!r}")
        if c.model not in MODELS:
            raise ValueError(f"model must be one of {tuple(MODELS)}, got {c.model!r}")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise ValueError(f"lr must be a positive number, got {c.lr}")
        return c


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(config, params):
    if config.optimizer == "sgd":
        return SGD(params, lr=config.lr, momentum=config.momentum,
                   weight_decay=config.weight_decay)
    return Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def evaluate(model, x, y, batch_size, device, num_classes):
    """(mean loss, accuracy, confusion matrix) of a model on host arrays x, y.
    The sums stay on the device; they are read back once, at the end."""
    check_labels(y, num_classes)
    was_training = model.training
    model.eval()
    xp = backend.xp_for(device)
    total, confusion = xp.zeros((), dtype=xp.float64), xp.zeros(num_classes ** 2, dtype=xp.int64)
    try:
        for xb, yb in data.batches(x, y, batch_size, device):
            logits = model.forward(xb)
            loss, _ = F.softmax_cross_entropy(logits, yb, check_labels=False)
            total += loss * len(yb)
            confusion += xp.bincount(yb * num_classes + logits.argmax(axis=1),
                                     minlength=num_classes ** 2)
    finally:
        model.train(was_training)
    total, confusion = float(total), backend.to_numpy(confusion).reshape(num_classes, -1)
    return total / len(y), float(numpy.trace(confusion)) / len(y), confusion


def _merge_resume(config, meta, explicit):
    """The checkpoint's run settings, with a clear error where the command differs.
    Unless given, the number of epochs is the checkpoint's and the output goes
    next to the checkpoint."""
    saved = meta.get("config")
    if not isinstance(saved, dict) or any(k not in saved for k in RUN_KEYS + ("epochs",)):
        raise checkpoint.CheckpointError(f"{config.resume} was not written by gpucnn train "
                                         "(its run settings are missing)")
    clashes = [k for k in RUN_KEYS if k in explicit and getattr(config, k) != saved[k]]
    if clashes:
        raise ValueError("--resume continues the checkpoint's run, but these settings differ "
                         "from it: " + ", ".join(f"{k}={getattr(config, k)!r} (checkpoint: "
                                                 f"{saved[k]!r})" for k in clashes))
    keep = {k: saved[k] for k in RUN_KEYS}
    if "epochs" not in explicit:
        keep["epochs"] = saved["epochs"]
    if "out" not in explicit:
        keep["out"] = str(pathlib.Path(config.resume).parent)
    return dataclasses.replace(config, **keep)


def train(config, model=None, log=print, explicit=()):
    """Run a training job; returns (history, model), history a list of per-epoch dicts.

    model: a Sequential to train instead of the config's built-in one.
    explicit: the Config fields the user set by hand (a resume checks them).
    """
    resume_meta = None
    if config.resume:
        resume_meta = checkpoint.read(config.resume)[0]
        config = _merge_resume(config, resume_meta, explicit)
    config = config.filled()
    device, why = backend.resolve_device(config.device)
    log(f"gpucnn: training on {device} ({why})")
    ds = data.load(config.dataset, config.data_dir, seed=config.seed)
    train_x, train_y = ds.train_x, ds.train_y
    if config.limit:
        train_x, train_y = train_x[:config.limit], train_y[:config.limit]
    log(f"gpucnn: {config.dataset} from {ds.source}: {len(train_y)} training and "
        f"{len(ds.test_y)} test images of shape {ds.image_shape}")

    manual_seed(config.seed)
    custom_model = model is not None
    if model is None:
        model = MODELS[config.model](num_classes=len(ds.classes), in_channels=ds.image_shape[0])
    model.to(device).train()
    optimizer = make_optimizer(config, model.parameters())
    rng = numpy.random.default_rng(config.seed)
    out = pathlib.Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.npz"
    history, start_epoch, start_step, partial = [], 0, 0, None
    if config.resume:
        resume_meta = checkpoint.restore(config.resume, model, optimizer)
        history, start_epoch, start_step = (resume_meta["history"], resume_meta["epoch"],
                                            resume_meta["step"])
        rng.bit_generator.state = resume_meta["rng_state"]
        partial = resume_meta.get("partial")
        log(f"gpucnn: resumed from {config.resume} at epoch {start_epoch + 1}, step {start_step}")

    def save(epoch, step, rng_state, part=None):
        meta = dict(version=1, epoch=epoch, step=step, rng_state=rng_state, partial=part,
                    config=dataclasses.asdict(config), history=history, classes=list(ds.classes),
                    num_classes=len(ds.classes), in_channels=int(ds.image_shape[0]),
                    data_stats=ds.stats, custom_model=custom_model)
        checkpoint.save(ckpt_path, model, optimizer, meta)

    check_labels(train_y, len(ds.classes), "training labels")  # once, not per step
    nb = data.num_batches(len(train_y), config.batch_size)
    step_fn = _step_function(config, device, model, optimizer, log)
    for epoch in range(start_epoch, config.epochs):
        epoch_state = rng.bit_generator.state
        order = rng.permutation(len(train_y))
        skip = start_step if epoch == start_epoch else 0
        loss_sum, correct, seen, train_time = ((partial["loss_sum"], partial["correct"],
                                                partial["seen"], partial["train_time"])
                                               if partial and skip else (0.0, 0, 0, 0.0))
        bar = _progress(nb, skip, f"epoch {epoch + 1}/{config.epochs}", config.progress)
        step = skip
        # Nothing is read back inside a step: the losses and the correct count are
        # read every READ_EVERY steps (progress bar, NaN stop) and at the epoch's end.
        sums = _DeviceSums(backend.xp_for(device), loss_sum, correct)
        try:
            t0 = time.perf_counter()
            for xb, yb in data.batches(train_x, train_y, config.batch_size, device, order, skip):
                loss, logits = step_fn(model, optimizer, xb, yb)
                step += 1
                sums.add(loss, logits, yb, step)
                seen += len(yb)
                now = time.perf_counter()
                train_time += now - t0
                t0 = now
                if sums.full():
                    loss_sum, correct = sums.read(epoch, ckpt_path, config.lr)
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}",
                                    img_s=f"{seen / train_time:.0f}")
                bar.update(1)
            loss_sum, correct = sums.read(epoch, ckpt_path, config.lr)
        except KeyboardInterrupt:
            bar.close()
            loss_sum, correct = sums.read(epoch, ckpt_path, config.lr, check=False)
            save(epoch, step, epoch_state, dict(loss_sum=loss_sum, correct=int(correct), seen=seen,
                                                train_time=train_time))
            log(f"gpucnn: interrupted at epoch {epoch + 1}, step {step}; saved {ckpt_path} "
                f"(continue with --resume {ckpt_path})")
            raise
        bar.close()
        partial, correct = None, int(correct)
        test_loss, test_acc, confusion = evaluate(model, ds.test_x, ds.test_y,
                                                  max(config.batch_size, 256), device,
                                                  len(ds.classes))
        elapsed = (history[-1]["elapsed_s"] if history else 0.0) + train_time
        row = dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_accuracy=correct / seen,
                   test_loss=test_loss, test_accuracy=test_acc,
                   images_per_s=seen / train_time, elapsed_s=elapsed)
        history.append(row)
        log(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f}, "
            f"test loss {test_loss:.4f}, test accuracy {100 * test_acc:.2f}%, "
            f"{row['images_per_s']:.0f} images/s, {elapsed:.1f} s")
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        save(epoch + 1, 0, rng.bit_generator.state)
        if epoch + 1 < config.epochs and train_time < 5:
            continue  # drawing takes about a second: skip it for very short epochs
        title = f"{config.dataset}, {config.model}, {config.optimizer} lr {config.lr:g}"
        plots.curves(history, out / "curves.png", title)
        plots.confusion(confusion, ds.classes, out / "confusion.png",
                        f"{config.dataset} test set, epoch {epoch + 1}: "
                        f"{100 * test_acc:.2f}% correct")
    return history, model


def _step_function(config, device, model, optimizer, log):
    """train_step, or on a GPU (unless cuda_graph is False) its CUDA-graph replay."""
    use_graph = config.cuda_graph if config.cuda_graph is not None else device == "cuda"
    if not use_graph:
        return train_step
    if device != "cuda":
        raise ValueError(f"cuda_graph needs device 'cuda', got {device!r}")
    from .graph import GraphedStep
    graphed = GraphedStep(model, optimizer, log=log)
    return lambda model, optimizer, x, y: graphed(x, y)


READ_EVERY = 20  # steps between reads of the running loss (each read is a device sync)


class _DeviceSums:
    """The epoch's running loss and correct count without a sync per step: each
    step's loss is written into a device buffer (one copy) and the correct count
    summed on the device; read() fetches both in one transfer, every READ_EVERY
    steps, and adds the losses up on the host in step order."""

    def __init__(self, xp, loss_sum, correct, every=None):
        self.every = every or READ_EVERY
        self.buffer = xp.zeros(self.every + 1, dtype=xp.float64)  # losses, then the count
        self.correct = xp.asarray(correct, dtype=xp.int64)
        self.loss_sum, self.steps = loss_sum, []  # (step, batch size) of each buffered loss

    def add(self, loss, logits, labels, step):
        self.buffer[len(self.steps)] = loss
        self.steps.append((step, len(labels)))
        self.correct += (logits.argmax(axis=1) == labels).sum()

    def full(self):
        return len(self.steps) == self.every

    def read(self, epoch, ckpt_path, lr, check=True):
        """(loss_sum, correct) on the host: one sync. Raises TrainingDiverged naming the
        step where the loss first became NaN or infinite."""
        self.buffer[self.every] = self.correct
        host = backend.to_numpy(self.buffer)
        for (step, n), value in zip(self.steps, host.tolist()):
            if check and not math.isfinite(value):
                raise TrainingDiverged(
                    f"the loss became {value} at epoch {epoch + 1}, step {step}; training "
                    f"stopped. The last good checkpoint is "
                    f"{ckpt_path if ckpt_path.exists() else 'not written yet'}. Try a lower "
                    f"learning rate, e.g. --lr {lr / 10:g}")
            self.loss_sum += value * n
        self.steps = []
        return self.loss_sum, int(host[self.every])


def _progress(total, initial, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", disable=not enabled,
                dynamic_ncols=True, leave=False)


def evaluate_checkpoint(path, data_dir=None, device=None, batch_size=256, log=print):
    """Load a checkpoint written by train() and evaluate it on its dataset's test set."""
    meta = checkpoint.read(path)[0]
    if meta.get("custom_model"):
        raise checkpoint.CheckpointError(
            f"{path} holds a model passed in from Python, not a built-in one; rebuild that "
            "model and load the weights with gpucnn.checkpoint.restore(path, model)")
    config = Config(**meta["config"])
    device, why = backend.resolve_device(device)
    log(f"gpucnn: evaluating on {device} ({why})")
    ds = data.load(config.dataset, data_dir or config.data_dir, seed=config.seed)
    model = MODELS[config.model](num_classes=meta["num_classes"], in_channels=meta["in_channels"])
    checkpoint.restore(path, model)
    model.to(device)
    loss, acc, confusion = evaluate(model, ds.test_x, ds.test_y, batch_size, device,
                                    len(ds.classes))
    return dict(dataset=config.dataset, epoch=meta["epoch"], test_loss=loss, test_accuracy=acc,
                per_class=(numpy.diag(confusion) / numpy.maximum(confusion.sum(1), 1)).tolist(),
                classes=list(ds.classes))


def default_out():
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
