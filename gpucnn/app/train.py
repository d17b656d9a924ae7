"""The training loop behind ``gpucnn train``: progress, metrics, checkpoints,
resume, plots, and a clean stop on NaN/inf or Ctrl-C."""
import contextlib
import dataclasses
import math
import pathlib
import sys
import time

import numpy

from .. import backend
from . import checkpoint, data, plots, runs
from ..backends.cpu import threads as cpu_threads
from .. import functional as F
from .config import Config  # noqa: F401  (train.Config: the public name, as before)
from .config import is_int, make_augment, make_optimizer, make_schedule, merge_resume
from ..errors import ConfigError, UserError
from .models import MODELS
from ..random import manual_seed
from ..step import check_labels, train_step

class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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


def _draw_plots(out, history, confusion, classes, config):
    title = f"{config.dataset}, {config.model}, {config.optimizer} lr {config.lr:g}"
    plots.curves(history, out / "curves.png", title)
    if confusion is not None:
        acc = history[-1]["test_accuracy"]
        plots.confusion(confusion, classes, out / "confusion.png",
                        f"{config.dataset} test set, epoch {history[-1]['epoch']}: "
                        f"{100 * acc:.2f}% correct")


def train(config, model=None, log=print):
    """Run a training job; returns (history, model), history a list of per-epoch dicts.

    model: a Sequential to train instead of the config's built-in one.
    Before any training the output folder is checked, locked and claimed
    (see Config); a UserError says what is wrong with the settings, files or folder.
    """
    resume_meta = None
    if config.resume:
        resume_meta = checkpoint.read(config.resume)[0]
        config = merge_resume(config, resume_meta)
    config = config.filled()
    if config.progress is None:
        config = dataclasses.replace(config, progress=sys.stderr.isatty())
    default_out = config.out is None
    if default_out:
        config = dataclasses.replace(config, out=str(runs.default_folder()))
    out = pathlib.Path(config.out)
    created = default_out or not out.exists()
    here = bool(config.resume) and out.resolve() == pathlib.Path(config.resume).parent.resolve()
    lock = runs.claim(out, resuming_here=here, overwrite=config.overwrite)
    try:
        with runs.interrupts() as interrupts:
            return _run(config, model, log, out, resume_meta, interrupts)
    except UserError:
        lock.release()
        if created:  # e.g. a dataset error: leave no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        lock.release()


def _run(config, model, log, out, resume_meta, interrupts):
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
    nb = data.num_batches(len(train_y), config.batch_size)
    schedule = make_schedule(config, optimizer, nb)
    augment = make_augment(config, ds.stats, config.seed + 1)
    rng = numpy.random.default_rng(config.seed)
    ckpt_path = out / runs.CHECKPOINT
    threads = cpu_threads.step_blas_threads()
    history, start_epoch, start_step, partial, confusion = [], 0, 0, None, None
    if config.resume:
        resume_meta = checkpoint.restore(config.resume, model, optimizer)
        history, start_epoch, start_step = (resume_meta["history"], resume_meta["epoch"],
                                            resume_meta["step"])
        rng.bit_generator.state = resume_meta["rng_state"]
        _restore_extras(resume_meta, schedule, augment)
        partial = resume_meta.get("partial")
        confusion = resume_meta.get("confusion")
        _warn_environment(resume_meta, device, threads, log)
        if start_epoch >= config.epochs and not start_step:
            log(f"gpucnn: {config.resume} has finished its {start_epoch} epochs; nothing to do "
                f"(pass --epochs N with N > {start_epoch} to train further)")
        else:
            log(f"gpucnn: resumed from {config.resume} at epoch {start_epoch + 1}, "
                f"step {start_step}")
    saved = dict(epoch=start_epoch if config.resume else None)

    def survivor():
        if saved["epoch"] is None:
            return "No checkpoint was written."
        return f"The last complete checkpoint is {ckpt_path} (epoch {saved['epoch']})."

    def save(epoch, step, rng_state, part=None, rows=None):
        meta = dict(version=1, epoch=epoch, step=step, rng_state=rng_state, partial=part,
                    config=dataclasses.asdict(config), history=history if rows is None else rows,
                    classes=list(ds.classes), num_classes=len(ds.classes),
                    in_channels=int(ds.image_shape[0]),
                    input_shape=[int(v) for v in ds.image_shape], data_stats=ds.stats,
                    custom_model=custom_model, device=device, blas_threads=threads,
                    confusion=confusion, **_extras(model, schedule, augment))
        with runs.writing(ckpt_path, survivor):
            checkpoint.save(ckpt_path, model, optimizer, meta)
        if not part:
            saved["epoch"] = epoch

    with runs.writing(out / runs.METRICS, survivor):
        runs.write_metrics(out, history)  # a resumed run's rows, rebuilt from its checkpoint
    if history and not all((out / name).exists() for name in runs.PLOTS):
        with runs.writing("the plots", survivor):
            _draw_plots(out, history, confusion and numpy.array(confusion), ds.classes, config)

    check_labels(train_y, len(ds.classes), "training labels")  # once, not per step
    step_fn = _step_function(config, device, model, optimizer, log)
    for epoch in range(start_epoch, config.epochs):
        epoch_state = rng.bit_generator.state
        skip = start_step if epoch == start_epoch else 0
        loss_sum, correct, seen, train_time = ((partial["loss_sum"], partial["correct"],
                                                partial["seen"], partial["train_time"])
                                               if partial and skip else (0.0, 0, 0, 0.0))
        step, bar, sums = skip, None, None
        try:  # from here on a Ctrl-C is answered with a checkpoint and a line
            order = rng.permutation(len(train_y))
            bar = _progress(nb, skip, f"epoch {epoch + 1}/{config.epochs}", config.progress)
            # Nothing is read back inside a step: the losses and the correct count are
            # read every READ_EVERY steps (progress bar, NaN stop) and at the epoch's end.
            sums = _DeviceSums(backend.xp_for(device), loss_sum, correct)
            t0 = time.perf_counter()
            for xb, yb in data.batches(train_x, train_y, config.batch_size, device, order, skip):
                with interrupts.step():  # Ctrl-C waits for the step's end: a whole step
                    if augment is not None:
                        xb = augment(xb)
                    loss, logits = step_fn(model, optimizer, xb, yb)
                    if schedule is not None:
                        schedule.step()
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
            bar.close()
            test_loss, test_acc, epoch_confusion = evaluate(model, ds.test_x, ds.test_y,
                                                            max(config.batch_size, 256), device,
                                                            len(ds.classes))
            elapsed = (history[-1]["elapsed_s"] if history else 0.0) + train_time
            row = dict(epoch=epoch + 1, train_loss=loss_sum / seen,
                       train_accuracy=int(correct) / seen, test_loss=test_loss,
                       test_accuracy=test_acc, images_per_s=seen / train_time, elapsed_s=elapsed)
            confusion = epoch_confusion.tolist()
            save(epoch + 1, 0, rng.bit_generator.state, rows=history + [row])
        except KeyboardInterrupt:
            # during the steps or the evaluation: keep the epoch's work so far; a
            # resume evaluates again (an evaluation changes nothing)
            if bar is not None:
                bar.close()
            if interrupts.cut_short:  # a second Ctrl-C inside a step: not a whole step
                log(f"gpucnn: interrupted twice inside step {step + 1} of epoch {epoch + 1}; "
                    f"that step was cut short, so nothing was saved. {survivor()}")
                raise
            if sums is not None:
                loss_sum, correct = sums.read(epoch, ckpt_path, config.lr, check=False)
            save(epoch, step, epoch_state, dict(loss_sum=loss_sum, correct=int(correct), seen=seen,
                                                train_time=train_time))
            log(f"gpucnn: interrupted at epoch {epoch + 1}, step {step}; saved {ckpt_path} "
                f"(continue with --resume {ckpt_path})")
            raise
        partial = None
        history.append(row)
        try:
            with runs.writing(out / runs.METRICS, survivor):
                runs.write_metrics(out, history)
            log(f"epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f}, "
                f"test loss {test_loss:.4f}, test accuracy {100 * test_acc:.2f}%, "
                f"{row['images_per_s']:.0f} images/s, {elapsed:.1f} s")
            if epoch + 1 < config.epochs and train_time < 5:
                continue  # drawing takes about a second: skip it for very short epochs
            with runs.writing("the plots", survivor):
                _draw_plots(out, history, epoch_confusion, ds.classes, config)
        except KeyboardInterrupt:
            log(f"gpucnn: interrupted after epoch {epoch + 1} was saved in {ckpt_path} "
                f"(continue with --resume {ckpt_path})")
            raise
    log(f"gpucnn: done; metrics, checkpoint and plots are in {out}")
    return history, model


def _extras(model, schedule, augment):
    """The random layers', schedule's and augmentation's state for the checkpoint's meta."""
    return dict(model_rng=model.random_state(),
                schedule=schedule.state_dict() if schedule is not None else None,
                augment=augment.get_rng_state() if augment is not None else None)


def _restore_extras(meta, schedule, augment):
    for name, obj, restore in (("schedule", schedule, "load_state_dict"),
                               ("augment", augment, "set_rng_state")):
        state = meta.get(name)
        if (state is None) != (obj is None):
            raise checkpoint.CheckpointError(f"the checkpoint's {name} state ({state}) does "
                                             f"not fit this run's ({obj!r})")
        if state is not None:
            getattr(obj, restore)(state)


def _warn_environment(meta, device, threads, log):
    """Repeatability holds bit for bit on the same device and BLAS thread count only."""
    then_threads, then_device = meta.get("blas_threads"), meta.get("device")
    if then_device and then_device != device:
        log(f"gpucnn: warning: this run was trained on {then_device} and resumes on {device}; "
            "the weights will not match a straight run bit for bit")
    if then_threads and threads and then_threads != threads:
        how = ("set OMP_NUM_THREADS=1 to match" if then_threads == 1 else
               f"matching needs {then_threads} BLAS threads and gpucnn.set_num_threads(1)")
        log(f"gpucnn: warning: this run was trained with {then_threads} BLAS threads and "
            f"resumes with {threads}; the weights will not match a straight run bit for bit "
            f"({how})")


def _step_function(config, device, model, optimizer, log):
    """train_step, or on a GPU (unless cuda_graph is False) its CUDA-graph replay.
    The graph serves every option: the schedule and warmup write optimizer.lr, which
    the step reads from the device; label smoothing is fixed for the run; the
    augmentation has run on the batch before the step gets it."""
    smoothing = config.label_smoothing
    use_graph = config.cuda_graph if config.cuda_graph is not None else device == "cuda"
    if not use_graph:
        return lambda model, optimizer, x, y: train_step(model, optimizer, x, y,
                                                         label_smoothing=smoothing)
    if device != "cuda":
        raise ConfigError(f"cuda_graph needs device 'cuda', got {device!r}")
    from ..backends.cuda.graph import GraphedStep
    graphed = GraphedStep(model, optimizer, label_smoothing=smoothing, log=log)
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
    """Evaluate a checkpoint written by train() on its dataset's test set, scaled by
    the normalisation saved in the checkpoint (only the test files are read)."""
    from . import inference
    if not is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    model, meta, device, why = inference.from_checkpoint(path, device)
    saved = meta["config"]
    log(f"gpucnn: evaluating on {device} ({why})")
    ds = data.load_test(saved["dataset"], data_dir or saved.get("data_dir"),
                        seed=saved.get("seed", 0), stats=meta["data_stats"])
    if len(ds.test_y) == 0:
        raise data.DataError(f"the {saved['dataset']} test set is empty; nothing to evaluate")
    loss, acc, confusion = evaluate(model, ds.test_x, ds.test_y, batch_size, device,
                                    len(ds.classes))
    return dict(dataset=saved["dataset"], epoch=meta["epoch"], test_loss=loss, test_accuracy=acc,
                per_class=(numpy.diag(confusion) / numpy.maximum(confusion.sum(1), 1)).tolist(),
                classes=list(ds.classes))
