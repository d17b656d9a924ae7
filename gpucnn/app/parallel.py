"""``gpucnn train`` on several processes (``mpiexec -n R gpucnn train ...``): what
the training loop settles with the other ranks, and when.

Rank 0 alone reads the resumed checkpoint, claims the run folder, writes the
checkpoint, metrics and plots and prints; the others train and evaluate their
share and print nothing but errors that are theirs alone. Every rank meets the
others at the same points, in the same order:

- the setup: rank 0's settings and folder (a broadcast), then every rank's
  errors and a record of its settings, data and model (a gather), so that a
  mistake is reported once, by rank 0, and a mismatch names the setting;
- every step: a stop flag (a signal, a NaN loss) whose max over the ranks is
  started after step k and read after step k+1, so the host never waits for it
  and every rank stops after the same step;
- every epoch's end: the train and test sums (a gather, added in rank order, so
  every rank gets the same numbers), then rank 0's outcome of writing the
  checkpoint, and of the metrics and plots (gathers that also carry the stop
  flags raised meanwhile: such a stop comes after the epoch is saved).

An error that every rank raises at one of these points is marked agreed (every
rank raises the same exception; on the ranks other than 0 it is marked quiet too:
the cli prints rank 0's alone). Any other error on one rank ends the whole world at
once (MPI_Abort) with its line.
"""
import contextlib
import os
import signal
import time
import traceback
import zlib

import numpy

import gpucnn

from .. import backend
from ..distributed import DistributedError, get_world, nccl_version
from ..errors import ConfigError, UserError
from . import runs
from .config import FIELDS, check_setting

# Stop flags, one bit each, combined by their max over the ranks: any rank's highest
# bit survives it, so a NaN stop wins over SIGTERM, SIGTERM over Ctrl-C.
SIGINT_FLAG, SIGTERM_FLAG, DIVERGED_FLAG = 1, 2, 4


def agreed(error, quiet=False):
    """Mark an exception that every rank raises at the same point; quiet: one that
    another rank (rank 0) reports."""
    error.gpucnn_agreed, error.gpucnn_quiet = True, quiet
    return error


def is_agreed(error):
    return getattr(error, "gpucnn_agreed", False)


def is_quiet(error):
    return getattr(error, "gpucnn_quiet", False)


def world_for(config):
    """This process's world, with the config's --dist-timeout (the default where the
    value is bad: the setup then reports it like any other setting)."""
    timeout = config.dist_timeout
    try:
        if timeout is not None:
            check_setting("dist_timeout", timeout)
    except ConfigError:
        timeout = None
    return get_world(timeout)


def end_world(world, error, code):
    """An error on this rank alone: its line (and, for a bug, its traceback), then
    every rank ends now instead of waiting for this one until the timeout."""
    if isinstance(error, UserError):
        message = f"error: rank {world.rank}: {error}"
    elif isinstance(error, KeyboardInterrupt):
        message = f"rank {world.rank} was interrupted twice; every rank ends now, saving nothing"
    else:
        traceback.print_exc()
        message = (f"rank {world.rank} failed ({type(error).__name__}: {error}); the run "
                   "ends on every rank")
    world.abort(message, code)


class AgreedInterrupts(runs.Interrupts):
    """Ctrl-C and SIGTERM on one rank of several: the signal is only noted (a flag the
    ranks agree on at the next step boundary, see StopFlags), never raised where it
    lands, since a rank leaving a collective would leave the others waiting.

    A second signal raises at once (a run that hangs can still be stopped; the cli
    then ends every rank, and nothing is saved) only where it is a person asking
    again: a second SIGINT, or any signal REPEAT_GRACE_S after the first. A SIGTERM
    within that grace is the first one again: MPICH's mpiexec forwards every SIGTERM
    it gets to every rank, and Slurm (scancel, a time limit) signals the launcher and
    the ranks alike, so one request reaches a rank twice, milliseconds apart. SIGINT
    is not repeated so: the launcher forwards a Ctrl-C once (a second one makes it
    kill the ranks itself), and the ranks run outside the terminal's process group."""

    REPEAT_GRACE_S = 5.0

    def __init__(self):
        super().__init__()
        self.flags, self.first = 0, None

    def handler(self, signum, frame):
        now = time.monotonic()
        if self.flags and ((signum == signal.SIGINT and self.flags & SIGINT_FLAG)
                           or now - self.first > self.REPEAT_GRACE_S):
            self.cut_short = True
            raise KeyboardInterrupt() if signum == signal.SIGINT else runs.Terminated(
                f"signal {signum}")
        if not self.flags:
            self.first = now
        self.flags |= SIGINT_FLAG if signum == signal.SIGINT else SIGTERM_FLAG

    @property
    def stopping(self):
        """A stop is under way: runs.interrupts leaves this handler in place, so that
        the launcher's repeat of the signal, landing after the checkpoint, does not
        kill the rank on its way out (status 15, not 143)."""
        return bool(self.flags)

    @contextlib.contextmanager
    def step(self):
        yield


def stop_error(flags):
    """The exception that ends every rank for agreed stop flags (SIGTERM wins)."""
    return agreed(runs.Terminated("signal 15") if flags & SIGTERM_FLAG else KeyboardInterrupt())


class StopFlags:
    """The per-step agreement: after step k, start the max of this rank's flags over
    the ranks; after step k+1 (queued already on a GPU) read it. Every rank reads
    the same agreements after the same steps, so all stop after the same step."""

    def __init__(self, world):
        self.world, self.pending = world, None

    def after_step(self, flags):
        """The agreed flags of the previous step (0: go on); starts this step's."""
        agreed_flags = self.pending.result() if self.pending is not None else 0
        self.pending = None if agreed_flags else self.world.agree_later(flags)
        return agreed_flags

    def finish(self):
        """The agreement still open at the end of the steps, waited for."""
        agreed_flags = self.pending.result() if self.pending is not None else 0
        self.pending = None
        return agreed_flags


class Team:
    """The ranks of one run as the training loop sees them: rank 0's log (the others
    are silent), the setup's exchanges and rank 0's writing."""

    def __init__(self, world, log, interrupts):
        self.world, self.rank, self.size = world, world.rank, world.size
        self.is_root = world.is_root
        self.log = log if self.is_root else _silent
        self.interrupts = interrupts
        self.local_error = None  # this rank's settings error, reported at the setup's gather

    def from_root(self, work):
        """work() on rank 0; its result, or its UserError, on every rank."""
        result = error = None
        if self.is_root:
            try:
                with self.world.busy("rank 0's part of the setup"):
                    result = work()
            except UserError as e:
                error = e
        error, shared = self.world.bcast_host((error, _shareable(result)))
        if error is not None:
            raise self._raise_for(error, 0)
        return result if self.is_root else shared

    def gather_checked(self, work, describe):
        """work() on every rank, then one gather of each rank's error or its
        describe(result) (a dict of what must match on every rank) and stop flags.
        The first error in rank order is raised on every rank (rank 0 prints it); a
        stop flag ends every rank; a mismatch is one line naming what differs."""
        try:
            if self.local_error is not None:
                raise self.local_error
            with self.world.busy("its setup"):  # a slow decode is not a rank gone silent
                result, error = work(), None
        except UserError as e:
            result, error = None, e
        self.local_error = None
        record = None if error is not None else describe(result)
        answers = self.world.allgather_host((error, record, self.interrupts.flags))
        errors = [a[0] for a in answers]
        for rank, theirs in enumerate(errors):
            if theirs is not None:  # named by rank unless every rank had this very error
                same = all(str(other) == str(theirs) for other in errors)
                raise self._raise_for(theirs, rank, same)
        flags = max(a[2] for a in answers)
        if flags:
            raise stop_error(flags)
        mismatch = _mismatch([a[1] for a in answers])
        if mismatch:
            raise self._raise_for(ConfigError(mismatch), 0)
        return result

    def _raise_for(self, error, rank, everywhere=True):
        """What every rank raises for an error found on `rank` (named where only some
        ranks had it); quiet but on rank 0."""
        if rank != 0 or not everywhere:
            try:
                error = type(error)(f"rank {rank}: {error}")
            except TypeError:
                error = UserError(f"rank {rank}: {error}")
        return agreed(error, quiet=not self.is_root)

    def outcome(self, work):
        """work() on rank 0 (the writing of files); then one gather of its error and
        every rank's stop flags. Rank 0's error is raised on every rank; returns the
        stop flags that came in meanwhile (0: none)."""
        error = None
        if self.is_root:
            try:
                with self.world.busy("writing the run's files"):
                    work()
            except UserError as e:
                error = e
        answers = self.world.allgather_host((error, self.interrupts.flags))
        if answers[0][0] is not None:
            raise self._raise_for(answers[0][0], 0)
        return max(a[1] for a in answers)

    def watch(self, what):
        """A blocking wait outside MPI (a GPU sync behind NCCL) that the timeout covers."""
        return self.world.watch(what)


def _silent(*args, **kwargs):
    return None


def _shareable(result):
    """What of rank 0's setup result the other ranks receive: no open lock."""
    if isinstance(result, tuple):
        return tuple(None if isinstance(v, runs.FolderLock) else v for v in result)
    return result


def _mismatch(records):
    """The line for the first entry that differs between the ranks' records, or None."""
    options = {f.name: f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in FIELDS}
    for key in records[0]:
        values = [r.get(key) for r in records]
        if any(v != values[0] for v in values):
            ranks = ", ".join(f"rank {r} has {v}" for r, v in enumerate(values)
                              if r == 0 or v != values[0])
            return (f"the ranks do not run the same {options.get(key, key)}: {ranks}; start "
                    "every rank with the same command, data and gpucnn")
    return None


def describe(config, device, ds, train_y, model):
    """What must be the same on every rank: the settings, gpucnn, the device kind, the
    data (sizes, shapes, classes, normalisation and a checksum of the labels) and
    the model's parameter shapes."""
    record = {k: repr(v) for k, v in sorted(vars(config).items())  # data_dir: checked by content
              if k not in ("out", "progress", "dist_timeout", "data_dir")}
    labels = zlib.crc32(numpy.ascontiguousarray(train_y).tobytes())
    labels = zlib.crc32(numpy.ascontiguousarray(ds.test_y).tobytes(), labels)
    record.update({
        "gpucnn version": gpucnn.__version__, "device": device,
        "training data": f"{len(train_y)} images of shape {tuple(ds.image_shape)}",
        "test data": f"{len(ds.test_y)} images", "classes": repr(list(ds.classes)),
        "normalisation": repr(ds.stats), "labels (CRC-32)": f"{labels:08x}",
        "model": repr({k: tuple(v.shape) for k, v in model.state_dict().items()})})
    return record


def use_local_gpu(world, asked):
    """Before anything touches a GPU: rank r takes GPU local_rank mod (GPUs on its
    node), so the ranks of one node share them out. Returns its index, or None
    (one process, the CPU asked for, or no GPU: resolve_device says why)."""
    asked = (asked or os.environ.get("GPUCNN_DEVICE") or "auto").lower()
    if not world.is_distributed or asked == "cpu":
        return None
    count = backend.gpu_count()
    if count < 1:
        return None
    index = world.device_index(count)
    backend.use_gpu(index)
    return index


def add_up(rows):
    """The sum of the ranks' rows of numbers (or arrays), column by column, added in
    rank order: every rank gets the same bits, whatever MPI's reduction order."""
    total = list(rows[0])
    for row in rows[1:]:
        total = [a + b for a, b in zip(total, row)]
    return total


def ranks_text(n):
    return "1 process" if n == 1 else f"{n} ranks"


def check_device(device, world):
    """NCCL must be there before the ranks meet on a GPU (the communicator is made
    after the setup's gather, where a rank failing alone would hang the others), and
    a GPU for each of the node's ranks: NCCL refuses two ranks on one GPU."""
    if device != "cuda":
        return
    if nccl_version() is None:
        raise DistributedError("several ranks on GPUs sum their gradients with NCCL, which "
                               "CuPy cannot load here; install it (pip install "
                               "nvidia-nccl-cu12, or -cu13) or train with --device cpu")
    gpus = backend.gpu_count()
    if world.local_size > gpus:
        raise DistributedError(
            f"{world.local_size} ranks run on this node but it has {gpus} GPU"
            f"{'s' if gpus != 1 else ''}, and NCCL cannot put two ranks on one GPU; start "
            f"at most {gpus} rank{'s' if gpus != 1 else ''} per node (mpiexec -n, Slurm's "
            "--ntasks-per-node) or train with --device cpu")


def log_world(team, config, n_train, steps, device, gpu):
    """Rank 0's line on how the work is shared out and what a step takes."""
    batch = config.batch_size
    left = n_train - steps * team.size * batch
    where = (f"each on GPU (local rank mod {backend.gpu_count()})" if gpu is not None
             else f"each on {device}")
    team.log(f"gpucnn: {team.size} ranks, {where}: batch {batch} per rank, a global batch of "
             f"{team.size * batch} per step (--lr {config.lr:g} is used as given, not scaled "
             f"for it); {steps} steps per epoch"
             + (f", the {left} training images that fill no global batch left out (another "
                "set each epoch)" if left else ""))

