"""The training loop behind ``gpucnn train``: progress, metrics, checkpoints,
resume, plots, and a clean stop on NaN/inf or Ctrl-C."""
import contextlib
import dataclasses
import functools
import math
import pathlib
import re
import sys
import time
import warnings

import numpy

from .. import backend, distributed, nn
from . import checkpoint, data, parallel, plots, runs, tensorboard
from ..backends.cpu import threads as cpu_threads
from ..backends.precision import PRECISIONS, conv_precision
from .. import functional as F
from .config import Config  # train.Config: the public name
from .config import make_augment, make_optimizer, make_schedule, merge_resume
from ..errors import ConfigError, UserError
from .models import MODELS
from ..random import manual_seed
from ..step import check_labels, train_step
from ..validate import positive_int

class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def evaluate(model, x, y, batch_size, device, num_classes):
    """(mean loss, accuracy, confusion matrix) of a model on host arrays x, y.
    The sums stay on the device; they are read back once, at the end."""
    check_labels(y, num_classes)
    total, confusion = evaluate_sums(model, x, y, batch_size, device, num_classes)
    return total / len(y), float(numpy.trace(confusion)) / len(y), confusion


def evaluate_sums(model, x, y, batch_size, device, num_classes):
    """(summed loss, confusion matrix) of a model on host arrays x, y: what ranks that
    each evaluate a part of a test set add up (the means of parts would not)."""
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
    return float(total), backend.to_numpy(confusion).reshape(num_classes, -1)


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
    Under an MPI launcher (mpiexec -n R) each process is one rank of the run
    (gpucnn.app.parallel); config.batch_size is then each rank's batch.
    """
    world = parallel.world_for(config)
    if world.is_distributed:
        return _train_ranks(config, model, log, world)
    meta = checkpoint.read(config.resume)[0] if config.resume else None
    config, plain = _settle(config, model, meta)
    config, out, created, lock = _claim(config)
    try:
        with runs.interrupts() as interrupts:
            return _run(config, model, log, out, interrupts, plain)
    except BaseException:
        lock.release()
        _remove_unused(out, created)
        raise
    finally:
        lock.release()


def _settle(config, model, meta):
    """(config, plain): a resume's settings merged with its checkpoint's (meta), the
    defaults filled in, and whether progress goes to a log file as lines."""
    if config.resume:
        if meta.get("custom_model") and model is None:
            raise checkpoint.CheckpointError(
                f"{config.resume} holds a model passed in from Python, not a built-in one; "
                "rebuild that model and pass it: gpucnn.train.train(gpucnn.train.Config("
                "resume=path, epochs=N), model=net)")
        config = merge_resume(config, meta)
    config = config.filled()
    plain = config.progress is None and not sys.stderr.isatty()  # a log file: lines, no bar
    if config.progress is None:
        config = dataclasses.replace(config, progress=not plain)
    return config, plain


def _claim(config):
    """(config, out, created, lock): the run folder chosen, checked and locked."""
    default_out = config.out is None
    if default_out:
        config = dataclasses.replace(config, out=str(runs.default_folder()))
    out = pathlib.Path(config.out)
    created = default_out or not out.exists()
    here = bool(config.resume) and out.resolve() == pathlib.Path(config.resume).parent.resolve()
    lock = runs.claim(out, resuming_here=here, overwrite=config.overwrite)
    return config, out, created, lock


def _remove_unused(out, created):
    if created and not runs.holds_run(out):  # e.g. a dataset error or a NaN stop before
        with contextlib.suppress(OSError):  # the first checkpoint: no empty folder left
            (out / runs.METRICS).unlink(missing_ok=True)
            out.rmdir()


def _train_ranks(config, model, log, world):
    """train() as one rank of several: rank 0 reads the resumed checkpoint's record,
    settles the config and claims the folder; every rank then settles its own config
    with that record, and the setup's gather compares them."""
    with runs.interrupts(parallel.AgreedInterrupts) as interrupts:
        team = parallel.Team(world, log, interrupts)
        settled = team.from_root(lambda: _settle_root(config, model))
        root_config, plain, meta, out, created, lock = settled
        if not team.is_root:
            try:
                config = dataclasses.replace(_settle(config, model, meta)[0], out=str(out),
                                             progress=False)
            except UserError as e:  # reported at the setup's gather, with the others'
                team.local_error, config = e, root_config
            plain = False
        else:
            config = root_config
        try:
            return _run(config, model, team.log, out, interrupts, plain, team)
        except BaseException:
            if lock is not None:
                lock.release()
                _remove_unused(out, created)
            raise
        finally:
            if lock is not None:
                lock.release()


def _settle_root(config, model):
    meta = checkpoint.read(config.resume)[0] if config.resume else None
    config, plain = _settle(config, model, meta)
    config, out, created, lock = _claim(config)
    return config, plain, meta, out, created, lock


def _run(config, model, log, out, interrupts, plain=False, team=None):
    if team is None:
        run = _setup(config, model, log, out)
    else:  # every rank's setup errors and settings, compared before any collective
        run = team.gather_checked(lambda: _setup(config, model, log, out, team),
                                  lambda r: parallel.describe(config, r.device, r.ds, r.train_y,
                                                              r.model))
    run.plain_progress = plain
    meta = _restore(run) if config.resume else None
    # --precision, else a resumed GPU run's, else the process's (gpucnn.set_conv_precision)
    asked = config.precision or _resumed_precision(meta, run.device)
    run.precision = _conv_precision(asked, run.device, log, config.precision is not None)
    if meta is not None and meta.get("conv_precision") not in (None, run.precision) \
            and meta.get("device") == run.device:
        log(f"gpucnn: warning: this run was trained with conv precision "
            f"{meta['conv_precision']} and resumes with {run.precision}; the weights will "
            "not match a straight run bit for bit")
    # the process-wide setting, for this run only (a caller's own is restored after)
    with (conv_precision(asked) if asked and asked == run.precision
          else contextlib.nullcontext()):
        return _train_epochs(run, interrupts)


def _resumed_precision(meta, device):
    if meta is None or meta.get("device") != device:
        return None  # a CPU run's fp32 says nothing about what a GPU should use
    precision = meta.get("conv_precision")
    return precision if precision in PRECISIONS else None


def _conv_precision(asked, device, log, said):
    """The precision float32 convolutions run with on this device (what the backend
    makes of the one asked for: FP32 on the CPU and on a GPU without TF32 tensor
    cores); one line where --precision (said) asked for one it cannot run."""
    ops = backend.ops_for(backend.xp_for(device))
    with conv_precision(asked) if asked else contextlib.nullcontext():
        effective = ops.conv_precision(numpy.float32)
    if said and asked != effective:
        log(f"gpucnn: warning: --precision {asked} needs a GPU with TF32 tensor cores "
            f"(compute capability 8.0 or later); convolutions on {device} compute in FP32")
    return effective


def _train_epochs(run, interrupts):
    config, log, team, out = run.config, run.log, run.team, run.out
    if team is None:
        _rewrite_outputs(run)
    else:
        _join_ranks(run)
    check_labels(run.train_y, len(run.ds.classes), "training labels")  # once, not per step
    step_fn = _step_function(config, run.device, run.model, run.optimizer, log, run.reducer)
    for epoch in range(run.start_epoch, config.epochs):
        row, confusion, train_time = _epoch(run, epoch, interrupts, step_fn)
        run.partial = None
        run.history.append(row)
        if team is None:
            _after_epoch(run, row, confusion, train_time)
        else:
            _after_epoch_ranks(run, row, confusion, train_time)
    if run.reducer is not None:  # the model goes back to the caller without its hooks
        run.reducer.close()
    log(f"gpucnn: done; metrics, checkpoint and plots are in {out}")
    return run.history, run.model


def _rewrite_outputs(run):
    """A resumed run's metrics (rebuilt from its checkpoint) and any missing plots."""
    if run.history:
        _write_metrics(run)
    if run.history and not all((run.out / name).exists() for name in runs.PLOTS):
        with runs.writing("the plots", run.survivor):
            _draw_plots(run.out, run.history, run.confusion and numpy.array(run.confusion),
                        run.ds.classes, run.config)


def _join_ranks(run):
    """Once every rank's setup is known to be good: the communicator, sync-BN, rank 0's
    weights on every rank, the gradient reducer; rank 0 rewrites a resumed run's
    outputs. A stop asked for meanwhile ends the run here, before any step."""
    team, config = run.team, run.config
    comm = distributed.communicator_for(team.world, backend.xp_for(run.device))
    if config.sync_bn:
        distributed.convert_sync_batchnorm(run.model, comm)
    for _, module in run.model.named_modules():  # each rank its rows of the global masks
        if isinstance(module, nn.Dropout):
            module.set_share(team.rank, team.size)
    distributed.broadcast_state(run.model, comm)
    run.reducer = distributed.GradientReducer(run.model, comm)
    flags = team.outcome(lambda: _rewrite_outputs(run))
    if flags:
        raise parallel.stop_error(flags)


@dataclasses.dataclass
class _Run:
    """A training run from its setup to its last epoch: what the epochs work on,
    where they start and what a checkpoint saves."""
    config: Config
    out: pathlib.Path
    log: object
    device: str
    ds: data.Dataset
    train_x: numpy.ndarray
    train_y: numpy.ndarray
    model: object
    custom_model: bool  # a network passed in from Python, not a built-in one
    optimizer: object
    batches: int  # per epoch
    schedule: object
    augment: object
    rng: numpy.random.Generator  # the epochs' shuffling
    threads: object  # the BLAS threads of a CPU step (gpucnn.backends.cpu.threads)
    history: list = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    start_step: int = 0
    partial: dict = None  # a resumed mid-epoch checkpoint's running sums
    confusion: list = None  # the last evaluation's confusion matrix
    saved_epoch: int = None  # that of the last complete checkpoint; None: none written
    float_warnings: object = None  # _FloatWarnings, set in __post_init__
    plain_progress: bool = False  # progress lines for a log file instead of the bar
    team: object = None  # the ranks of a run under mpiexec (parallel.Team); None: one process
    reducer: object = None  # their gradient average (gpucnn.distributed.GradientReducer)
    stop_flags: int = 0  # a stop the ranks agreed on at an epoch's end, after its checkpoint
    precision: str = "fp32"  # what float32 convolutions ran with (docs/precision.md)

    def __post_init__(self):
        self.float_warnings = _FloatWarnings(self.log)

    @property
    def ckpt_path(self):
        return self.out / runs.CHECKPOINT

    @property
    def ranks(self):
        return 1 if self.team is None else self.team.size

    def survivor(self):
        if self.saved_epoch is None:
            return "No checkpoint was written."
        return f"The last complete checkpoint is {self.ckpt_path} (epoch {self.saved_epoch})."

    def save(self, epoch, step, rng_state, part=None, rows=None):
        """The checkpoint at `step` of `epoch` (0: the epoch's start), with the
        shuffling state that repeats the epoch and, mid-epoch, its running sums."""
        ds = self.ds
        meta = dict(version=1, epoch=epoch, step=step, rng_state=rng_state, partial=part,
                    config=dataclasses.asdict(self.config),
                    history=self.history if rows is None else rows,
                    classes=list(ds.classes), num_classes=len(ds.classes),
                    in_channels=int(ds.image_shape[0]),
                    input_shape=[int(v) for v in ds.image_shape], data_stats=ds.stats,
                    custom_model=self.custom_model, device=self.device,
                    blas_threads=self.threads, confusion=self.confusion,
                    world_size=self.ranks, global_batch=self.ranks * self.config.batch_size,
                    conv_precision=self.precision,
                    **_extras(self.model, self.schedule, self.augment))
        with runs.writing(self.ckpt_path, self.survivor):
            checkpoint.save(self.ckpt_path, self.model, self.optimizer, meta)
        if not part:
            self.saved_epoch = epoch


def _dataset_options(settings, spec, input_shape=None):
    """The settings (a config as a dict) the dataset's loader takes; a checkpoint's
    input shape (C, H, W) fixes the channels and size it was trained on."""
    options = {k: settings.get(k) for k in spec.options}
    if input_shape is not None and "image_size" in options:
        options.update(channels=int(input_shape[0]),
                       image_size=f"{int(input_shape[1])}x{int(input_shape[2])}")
    if "progress" in options:
        options["progress"] = bool(options["progress"])
    return options


def _setup(config, model, log, out, team=None):
    """The device, the data, the model (the config's built-in one, or the given
    one), its optimizer, schedule and augmentation, and the shuffling generator,
    all seeded from config.seed in the order that a resume repeats. One rank of
    several (team) takes its node's share of the GPUs and its steps per epoch from
    gpucnn.distributed; nothing here waits for the other ranks."""
    gpu = parallel.use_local_gpu(team.world, config.device) if team is not None else None
    device, why = backend.resolve_device(config.device)
    log(f"gpucnn: training on {device} ({why})")
    ds = data.load(config.dataset, config.data_dir, seed=config.seed,
                   options=_dataset_options(dataclasses.asdict(config),
                                            data.dataset(config.dataset)))
    for line in ds.warnings:
        log(line)
    train_x, train_y = ds.train_x, ds.train_y
    if config.limit:
        train_x, train_y = train_x[:config.limit], train_y[:config.limit]
    log(f"gpucnn: {config.dataset} from {ds.source}: {len(train_y)} training and "
        f"{len(ds.test_y)} test images of shape {ds.image_shape}")

    manual_seed(config.seed)
    custom_model = model is not None
    if model is None:
        model = MODELS[config.model].build(num_classes=len(ds.classes),
                                           input_shape=ds.image_shape)
    model.to(device).train()
    optimizer = make_optimizer(config, model.parameters())
    if team is None:
        nb = data.num_batches(len(train_y), config.batch_size)
    else:
        nb = distributed.steps_per_epoch(len(train_y), team.size, config.batch_size)
        parallel.check_device(device, team.world)
        parallel.log_world(team, config, len(train_y), nb, device, gpu)
    schedule = make_schedule(config, optimizer, nb)
    augment = make_augment(config, ds.stats, config.seed + 1,
                           *((team.rank, team.size) if team is not None else ()))
    rng = numpy.random.default_rng(config.seed)
    return _Run(config, out, log, device, ds, train_x, train_y, model, custom_model, optimizer,
                nb, schedule, augment, rng, cpu_threads.step_blas_threads(), team=team)


def _restore(run):
    """Load the resumed checkpoint into the run: the weights and optimizer state,
    the history, where it stopped, and the shuffling, schedule and augmentation
    states; returns the checkpoint's record."""
    config, log, team = run.config, run.log, run.team
    if team is None:
        meta = checkpoint.restore(config.resume, run.model, run.optimizer)
    else:  # read by rank 0 alone, loaded by every rank
        content = team.from_root(lambda: checkpoint.read(config.resume))
        meta = team.gather_checked(lambda: checkpoint.restore(config.resume, run.model,
                                                              run.optimizer, content),
                                   lambda meta: {})
    run.history, run.start_epoch, run.start_step = meta["history"], meta["epoch"], meta["step"]
    run.rng.bit_generator.state = meta["rng_state"]
    planned = run.schedule.state_dict() if run.schedule is not None else None
    _restore_extras(meta, run.schedule, run.augment)
    _replan_schedule(run, planned, meta["config"]["epochs"], _rescale_world(run, meta))
    run.partial = meta.get("partial")
    run.confusion = meta.get("confusion")
    _warn_environment(meta, run.device, run.threads, log)
    if run.start_epoch >= config.epochs and not run.start_step:
        log(f"gpucnn: {config.resume} has finished its {run.start_epoch} epochs; nothing to do "
            f"(pass --epochs N with N > {run.start_epoch} to train further)")
    else:
        log(f"gpucnn: resumed from {config.resume} at epoch {run.start_epoch + 1}, "
            f"step {run.start_step}")
    run.saved_epoch = run.start_epoch
    return meta


def _rescale_world(run, meta):
    """A resume on another number of ranks than the checkpoint's: one line, and the
    resumed epoch's position carried over in images (its steps are of another global
    batch). Returns the schedule's step count at that position, None for the same ranks."""
    before, now = int(meta.get("world_size", 1)), run.ranks
    if before == now:
        return None
    batch = run.config.batch_size
    run.log(f"gpucnn: {run.config.resume} was trained on {parallel.ranks_text(before)} (a "
            f"global batch of {before * batch}) and resumes on {parallel.ranks_text(now)} (a "
            f"global batch of {now * batch}): the order of the data changes from here on, and "
            "the learning rate stays as it was")
    if run.start_step:
        run.start_step = min(run.batches, run.start_step * before // now)
    return run.start_epoch * run.batches + run.start_step


def _replan_schedule(run, planned, saved_epochs, last_step=None):
    """A resume that changes the run's length re-plans its schedule over the new
    total, as if it had been set for it from the start (cosine reaches 0 at the new
    end, step decays every third of it), and says so with the rate's jump. Going on
    with the old plan instead would make a cosine climb back up past its end.
    last_step: the step count the new plan goes on from, where a resume on another
    number of ranks changed the steps per epoch (None: the checkpoint's)."""
    schedule, epochs = run.schedule, run.config.epochs
    if schedule is None or (epochs == saved_epochs and last_step is None):
        return
    now = schedule.state_dict()
    step = now["last_step"] if last_step is None else last_step
    if step == now["last_step"] and all(now[k] == v for k, v in planned.items()
                                        if k != "last_step"):
        return  # a plan that does not depend on the length (warmup alone)
    before = schedule.get_last_lr()
    schedule.load_state_dict(dict(planned, last_step=step))
    if last_step is not None:
        run.log(f"gpucnn: its {run.config.schedule} schedule is re-planned for "
                f"{run.batches} steps per epoch ({epochs * run.batches} in all), as if set "
                f"for them from the start; the learning rate at the resume point goes from "
                f"{before:.4g} to {schedule.get_last_lr():.4g}")
        return
    run.log(f"gpucnn: the run goes on to {epochs} epochs instead of {saved_epochs}: its "
            f"{run.config.schedule} schedule is re-planned over all {epochs} epochs "
            f"({epochs * run.batches} steps), as if set for them from the start; the learning "
            f"rate at step {now['last_step']} goes from {before:.4g} to "
            f"{schedule.get_last_lr():.4g}")


@dataclasses.dataclass
class _Epoch:
    """One epoch's running counts, where a Ctrl-C finds them."""
    index: int
    step: int  # steps done
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    train_time: float = 0.0
    bar: object = None
    sums: object = None
    evaluating: bool = False
    diverged: str = None  # under mpiexec: this rank's NaN line, until the ranks agree to stop


def _epoch(run, epoch, interrupts, step_fn):
    """One epoch's steps (from the resumed step on), the test set and the
    checkpoint; returns (its metrics row, confusion matrix, seconds of training).
    A Ctrl-C during the steps or the evaluation saves the epoch's work so far."""
    config, ds = run.config, run.ds
    epoch_state = run.rng.bit_generator.state
    e = _Epoch(epoch, run.start_step if epoch == run.start_epoch else 0)
    if run.partial and e.step and (run.team is None or run.team.is_root):  # the ranks' sums
        e.loss_sum, e.correct, e.seen, e.train_time = (
            run.partial[k] for k in ("loss_sum", "correct", "seen", "train_time"))
    try:  # from here on a Ctrl-C is answered with a checkpoint and a line
        with run.float_warnings.watch(e):
            _steps(run, e, interrupts, step_fn)
            e.evaluating = True
            if run.team is None:
                test_loss, test_acc, confusion = evaluate(run.model, ds.test_x, ds.test_y,
                                                          max(config.batch_size, 256),
                                                          run.device, len(ds.classes))
            else:
                test_loss, test_acc, confusion = _end_epoch_ranks(run, e)
        elapsed = (run.history[-1]["elapsed_s"] if run.history else 0.0) + e.train_time
        row = dict(epoch=epoch + 1, train_loss=e.loss_sum / e.seen,
                   train_accuracy=int(e.correct) / e.seen, test_loss=test_loss,
                   test_accuracy=test_acc, images_per_s=e.seen / e.train_time,
                   elapsed_s=elapsed, conv_precision=run.precision)
        run.confusion = confusion.tolist()
        save = functools.partial(run.save, epoch + 1, 0, run.rng.bit_generator.state,
                                 rows=run.history + [row])
        if run.team is None:
            save()
        else:  # rank 0 writes, once every rank's sums are in
            run.stop_flags |= run.team.outcome(save)
    except KeyboardInterrupt:
        _save_interrupted(run, e, epoch_state, interrupts)
        raise
    return row, confusion, e.train_time


def _steps(run, e, interrupts, step_fn):
    """The epoch's training steps from step e.step on, counted into e. Nothing is
    read back inside a step: the losses and the correct count are read every
    READ_EVERY steps (progress bar, NaN stop), for each plain progress line and at
    the epoch's end."""
    config, team = run.config, run.team
    order = run.rng.permutation(len(run.train_y))
    if team is not None:  # this rank's share of the same permutation
        order = distributed.shard(order, team.rank, team.size, config.batch_size)
    desc = f"epoch {e.index + 1}/{config.epochs}"
    e.bar = _progress(run.batches, e.step, desc, config.progress)
    e.sums = _DeviceSums(backend.xp_for(run.device), e.loss_sum, e.correct)
    plain = (_PlainProgress(run.batches, desc, run.log, run.ranks) if run.plain_progress
             else None)
    stop = parallel.StopFlags(team.world) if team is not None else None
    t0 = time.perf_counter()
    for xb, yb in data.batches(run.train_x, run.train_y, config.batch_size, run.device, order,
                               e.step):
        with interrupts.step():  # Ctrl-C waits for the step's end: a whole step
            if run.augment is not None:
                xb = run.augment(xb)
            loss, logits = step_fn(run.model, run.optimizer, xb, yb)
            if run.schedule is not None:
                run.schedule.step()
            e.step += 1
            e.sums.add(loss, logits, yb, e.step)
            e.seen += len(yb)
        now = time.perf_counter()
        e.train_time += now - t0
        t0 = now
        if e.sums.full():
            _read_sums(run, e)
            e.bar.set_postfix(loss=f"{e.loss_sum / e.seen:.4f}",
                              img_s=f"{e.seen * run.ranks / e.train_time:.0f}")
        e.bar.update(1)
        if plain is not None and plain.due(now, e.step):
            _read_sums(run, e)
            plain.line(e)
        if stop is not None:  # agreed one step late: the GPU has the next step queued
            _stop_if_agreed(run, e, stop.after_step(_local_flags(interrupts, e)))
    _read_sums(run, e)
    if stop is not None:
        _stop_if_agreed(run, e, stop.finish())
    e.bar.close()


def _read_sums(run, e, check=True):
    """e's running loss and correct count from the device (a sync). One rank of
    several keeps a NaN line to itself (e.diverged) until the ranks agree to stop:
    leaving alone would leave the others waiting in the next step's all-reduce."""
    if run.team is None:
        e.loss_sum, e.correct = e.sums.read(e.index, run.ckpt_path, run.config.lr, check)
        return
    with run.team.watch("reading the loss"):
        try:
            e.loss_sum, e.correct = e.sums.read(e.index, run.ckpt_path, run.config.lr,
                                                check and e.diverged is None)
        except TrainingDiverged as diverged:
            e.diverged = str(diverged)
            e.loss_sum, e.correct = e.sums.read(e.index, run.ckpt_path, run.config.lr, False)


def _local_flags(interrupts, e):
    return interrupts.flags | (parallel.DIVERGED_FLAG if e.diverged else 0)


def _stop_if_agreed(run, e, flags):
    """Every rank stops here for agreed flags: a NaN loss on any rank (its line, no
    checkpoint) before a signal (a KeyboardInterrupt, answered with a checkpoint)."""
    if not flags:
        return
    if flags & parallel.DIVERGED_FLAG:
        lines = run.team.world.allgather_host(e.diverged)
        raise parallel.agreed(TrainingDiverged(next(line for line in lines if line)),
                              quiet=not run.team.is_root)
    raise parallel.stop_error(flags)


def _end_epoch_ranks(run, e):
    """The epoch's end on every rank: the same running statistics everywhere (without
    sync-BN), this rank's part of the test set, then one gather of every rank's
    train and test sums, added in rank order; e then holds the epoch's totals.
    Returns (test loss, test accuracy, confusion matrix). A NaN on any rank stops
    here; a signal that came meanwhile stops after the epoch's checkpoint."""
    team, ds, config = run.team, run.ds, run.config
    if not config.sync_bn:
        distributed.average_buffers(run.model, team.world)
    part = distributed.shard_eval(len(ds.test_y), team.rank, team.size)
    check_labels(ds.test_y[part], len(ds.classes))
    test_sum, confusion = evaluate_sums(run.model, ds.test_x[part], ds.test_y[part],
                                        max(config.batch_size, 256), run.device,
                                        len(ds.classes))
    flags = _local_flags(team.interrupts, e)
    totals = team.world.allgather_host((e.loss_sum, int(e.correct), e.seen, test_sum, confusion,
                                        e.train_time, flags))
    _stop_if_agreed(run, e, max(t[6] for t in totals) & parallel.DIVERGED_FLAG)
    e.loss_sum, e.correct, e.seen, test_sum, confusion = parallel.add_up([t[:5] for t in totals])
    e.train_time = max(t[5] for t in totals)  # the slowest rank's
    run.stop_flags = max(t[6] for t in totals)
    n = len(ds.test_y)
    return test_sum / n, float(numpy.trace(confusion)) / n, confusion


def _save_interrupted(run, e, epoch_state, interrupts):
    """After a Ctrl-C inside epoch e: a mid-epoch checkpoint of its whole steps (a
    resume evaluates again; an evaluation changes nothing), or nothing where a
    second Ctrl-C cut a step short."""
    if e.bar is not None:
        e.bar.close()
    if interrupts.cut_short:  # a second Ctrl-C inside a step: not a whole step
        run.log(f"gpucnn: interrupted twice inside step {e.step + 1} of epoch {e.index + 1}; "
                f"that step was cut short, so nothing was saved. {run.survivor()}")
        return
    if e.sums is not None:  # several ranks: a NaN since the stop was agreed sets e.diverged
        _read_sums(run, e, check=run.team is not None)
    part = dict(loss_sum=e.loss_sum, correct=int(e.correct), seen=e.seen,
                train_time=e.train_time)
    if run.team is None:
        run.save(e.index, e.step, epoch_state, part)
    else:  # every rank stopped after this step: rank 0 saves the ranks' sums
        if not run.config.sync_bn:
            distributed.average_buffers(run.model, run.team.world)
        totals = run.team.world.allgather_host((e.loss_sum, int(e.correct), e.seen,
                                                e.train_time, e.diverged))
        diverged = [t[4] for t in totals if t[4]]
        if diverged:  # the model is NaN now: the last good checkpoint stays
            raise parallel.agreed(TrainingDiverged(diverged[0]), quiet=not run.team.is_root)
        loss_sum, correct, seen = parallel.add_up([t[:3] for t in totals])
        part.update(loss_sum=loss_sum, correct=int(correct), seen=seen,
                    train_time=max(t[3] for t in totals))
        run.team.outcome(lambda: run.save(e.index, e.step, epoch_state, part))
    run.log(f"gpucnn: interrupted at epoch {e.index + 1}, step {e.step}; saved {run.ckpt_path} "
            f"(continue with --resume {run.ckpt_path})")


# An epoch shorter than this many seconds of training skips the plots (unless it
# is the last): drawing them could take longer than the epoch itself.
PLOT_MIN_EPOCH_S = 5


def _write_metrics(run):
    """metrics.jsonl (and, with --tensorboard, OUT/tensorboard/) from the run's history."""
    with runs.writing(run.out / runs.METRICS, run.survivor):
        runs.write_metrics(run.out, run.history)
    if run.config.tensorboard:
        with runs.writing(run.out / tensorboard.FOLDER, run.survivor):
            tensorboard.write(run.out, run.history)


def _after_epoch(run, row, confusion, train_time):
    """A finished (and saved) epoch's metrics line, log line and plots."""
    out, epochs, ckpt_path = run.out, run.config.epochs, run.ckpt_path
    try:
        _write_metrics(run)
        run.log(f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, "
                f"test loss {row['test_loss']:.4f}, test accuracy "
                f"{100 * row['test_accuracy']:.2f}%, {row['images_per_s']:.0f} images/s, "
                f"{row['elapsed_s']:.1f} s")
        if row["epoch"] < epochs and train_time < PLOT_MIN_EPOCH_S:
            return
        with runs.writing("the plots", run.survivor):
            _draw_plots(out, run.history, confusion, run.ds.classes, run.config)
    except KeyboardInterrupt:
        run.log(f"gpucnn: interrupted after epoch {row['epoch']} was saved in {ckpt_path} "
                f"(continue with --resume {ckpt_path})")
        raise


def _after_epoch_ranks(run, row, confusion, train_time):
    """_after_epoch on rank 0, the others waiting for its outcome; then a stop that any
    rank was asked for during the epoch's end, with the epoch saved."""
    flags = run.stop_flags | run.team.outcome(
        lambda: _after_epoch(run, row, confusion, train_time))
    run.stop_flags = 0
    if flags:
        run.log(f"gpucnn: interrupted after epoch {row['epoch']} was saved in {run.ckpt_path} "
                f"(continue with --resume {run.ckpt_path})")
        raise parallel.stop_error(flags)


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
    """Repeatability holds bit for bit on the same device and BLAS thread count only
    (and conv precision: _run)."""
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


def _step_function(config, device, model, optimizer, log, reducer=None):
    """train_step, or on a GPU (unless cuda_graph is False) its CUDA-graph replay.
    The graph serves every option: the schedule and warmup write optimizer.lr, which
    the step reads from the device; label smoothing is fixed for the run; the
    augmentation has run on the batch before the step gets it. reducer: the ranks'
    gradient average, inside the step (and so inside the graph)."""
    smoothing = config.label_smoothing
    step = train_step if reducer is None else functools.partial(train_step, reducer=reducer)
    use_graph = config.cuda_graph if config.cuda_graph is not None else device == "cuda"
    if not use_graph:
        return lambda model, optimizer, x, y: step(model, optimizer, x, y,
                                                   label_smoothing=smoothing)
    if device != "cuda":
        raise ConfigError(f"cuda_graph needs device 'cuda', got {device!r}")
    from ..backends.cuda.graph import GraphedStep
    graphed = GraphedStep(model, optimizer, step=step, label_smoothing=smoothing, log=log)
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
                    f"stopped. " + (f"The last good checkpoint is {ckpt_path}. "
                                    if ckpt_path.exists() else "No checkpoint was written. ") +
                    f"Try a lower learning rate, e.g. --lr {lr / 10:g}")
            self.loss_sum += value * n
        self.steps = []
        return self.loss_sum, int(host[self.every])


class _FloatWarnings:
    """NumPy's floating-point RuntimeWarnings (overflow, invalid value, ...) raised
    inside an epoch's steps and evaluation, from any thread: gpucnn reports them
    itself, once. A NaN stop names the first in its one line; where the loss stays
    finite, one warning line names it. Other warnings pass through unchanged."""
    PATTERN = re.compile(r"(overflow|invalid value|divide by zero|underflow) encountered")

    def __init__(self, log):
        self.log, self.first, self.reported = log, None, False

    @contextlib.contextmanager
    def watch(self, e):
        """Catch them while epoch e (an _Epoch, whose .step says where) runs."""
        shown = warnings.showwarning

        def hook(message, category, *args, **kwargs):
            if issubclass(category, RuntimeWarning) and self.PATTERN.search(str(message)):
                if self.first is None:
                    where = "its evaluation" if e.evaluating else f"step {e.step + 1}"
                    self.first = f"{message} in epoch {e.index + 1}, {where}"
                return
            shown(message, category, *args, **kwargs)

        with warnings.catch_warnings():
            warnings.showwarning = hook
            try:
                yield
            except TrainingDiverged as diverged:
                if self.first is None:
                    raise
                again = TrainingDiverged(f"{diverged} (NumPy first reported {self.first})")
                vars(again).update(vars(diverged))  # parallel.agreed's mark, where it is set
                raise again from None
        if self.first is not None and not self.reported:
            self.reported = True
            self.log(f"gpucnn: warning: NumPy reported {self.first}; the loss stayed finite, "
                     "but a lower learning rate may be safer")


PLAIN_EVERY_S = 30  # seconds between the progress lines written to a log file


class _PlainProgress:
    """Off a terminal, where the bar is not drawn: a plain line every PLAIN_EVERY_S
    seconds of an epoch (step, running loss, images/s, time left), as CI logs show
    tqdm's. The running loss is read from the device only for a line: one sync per
    line, none per step."""

    def __init__(self, total, desc, log, ranks=1):
        self.total, self.desc, self.log, self.ranks = total, desc, log, ranks
        self.next = time.perf_counter() + PLAIN_EVERY_S

    def due(self, now, step):
        return now >= self.next and step < self.total  # the epoch's own line ends it

    def line(self, e):
        self.next = time.perf_counter() + PLAIN_EVERY_S
        left = (self.total - e.step) * e.train_time / e.step
        self.log(f"{self.desc}: step {e.step}/{self.total} ({100 * e.step // self.total}%), "
                 f"loss {e.loss_sum / e.seen:.4f}, {e.seen * self.ranks / e.train_time:.0f} "
                 "images/s, "
                 f"{_duration(left)} left")


def _duration(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _progress(total, initial, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", disable=not enabled,
                dynamic_ncols=True, leave=False)


def evaluate_checkpoint(path, data_dir=None, device=None, batch_size=256, log=print):
    """Evaluate a checkpoint written by train() on its dataset's test set, scaled by
    the normalisation saved in the checkpoint (only the test files are read)."""
    from . import inference
    positive_int(batch_size, "batch_size", error=ConfigError)
    model, meta, device, why = inference.from_checkpoint(path, device)
    saved = meta["config"]
    spec = data.dataset(saved["dataset"])
    if data_dir and not spec.reads_files:
        raise ConfigError(f"--data-dir {data_dir}: the checkpoint's dataset, "
                          f"{saved['dataset']}, is bundled and reads no files; leave "
                          "--data-dir out")
    log(f"gpucnn: evaluating on {device} ({why})")
    ds = data.load_test(saved["dataset"], data_dir or saved.get("data_dir"),
                        seed=saved.get("seed", 0), stats=meta["data_stats"],
                        options=_dataset_options(dict(saved, progress=False), spec,
                                                 meta.get("input_shape")))
    for line in ds.warnings:
        log(line)
    if spec.needs_data_dir and tuple(ds.classes) != tuple(meta.get("classes") or ()):
        raise data.DataError(f"{data_dir or saved.get('data_dir')}: its classes "
                             f"({', '.join(ds.classes)}) are not the checkpoint's "
                             f"({', '.join(map(str, meta.get('classes') or ()))})")
    if len(ds.test_y) == 0:
        raise data.DataError(f"the {saved['dataset']} test set is empty; nothing to evaluate")
    loss, acc, confusion = evaluate(model, ds.test_x, ds.test_y, batch_size, device,
                                    len(ds.classes))
    return dict(dataset=saved["dataset"], epoch=meta["epoch"], test_loss=loss, test_accuracy=acc,
                per_class=(numpy.diag(confusion) / numpy.maximum(confusion.sum(1), 1)).tolist(),
                classes=list(ds.classes))
