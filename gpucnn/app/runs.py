"""A training run's folder: choosing it, checking it before any training,
locking it against a second live run, and writing its metrics so that they
always match the checkpoint. Also the run's environment that decides whether
results repeat bit for bit (BLAS threads) and SIGTERM handled like Ctrl-C."""
import contextlib
import errno
import json
import os
import pathlib
import signal
import time

from ..errors import DiskFullError, RunFolderError

CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
PLOTS = ("curves.png", "confusion.png")
LOCK = ".gpucnn.lock"
# What a run writes; --overwrite removes exactly these, never other files.
RUN_FILES = (CHECKPOINT, METRICS) + PLOTS
DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def default_folder(root="runs"):
    """A new, empty runs/<date-time>, with -2, -3, ... appended when that is taken
    (two runs started in the same second get different folders: mkdir is atomic)."""
    stem = os.path.join(root, time.strftime("%Y%m%d-%H%M%S"))
    _check_parents(pathlib.Path(stem), "the default output folder")
    os.makedirs(root, exist_ok=True)
    for i in range(1, 10_000):
        path = stem if i == 1 else f"{stem}-{i}"
        try:
            os.mkdir(path)
            return pathlib.Path(path)
        except FileExistsError:
            continue
        except OSError as e:
            raise RunFolderError(f"cannot create the output folder {path}: {e.strerror}") from None
    raise RunFolderError(f"{root} holds 10,000 runs started this second; pass --out")


def _check_parents(path, what):
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            if parent == path:
                raise RunFolderError(f"{what} {path} is a file, not a folder; pass --out with "
                                     "a folder")
            raise RunFolderError(f"{what} {path} lies under {parent}, which is a file, not a "
                                 "folder; pass --out with a folder")


def check_writable(path, what="--out"):
    """Create the folder if needed and prove it takes a file, before any training."""
    path = pathlib.Path(path)
    _check_parents(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".gpucnn-write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise DiskFullError(f"{what} {path}: no space left to write there "
                                f"({e.strerror})") from None
        raise RunFolderError(f"{what} {path} is not writable ({e.strerror}); pass --out with a "
                             "folder you can write to") from None
    return path


def holds_run(path):
    """The run files in a folder that hold work: a checkpoint, or a metrics file with
    rows in it. Empty when it holds none (a run that stopped before its first
    checkpoint leaves at most an empty metrics file: the folder can be reused)."""
    path = pathlib.Path(path)
    found = [CHECKPOINT] if (path / CHECKPOINT).exists() else []
    try:
        if (path / METRICS).stat().st_size > 0:
            found.append(METRICS)
    except FileNotFoundError:
        pass
    return found


def _refuse_taken(path, found):
    """The line for a folder holding a run: how to continue it, where it can be
    continued (never a checkpoint that is not there)."""
    if CHECKPOINT in found:
        return (f"--out {path} already holds a run ({', '.join(found)}); pass --resume "
                f"{path / CHECKPOINT} to continue it, --overwrite to replace it, or another "
                "--out")
    return (f"--out {path} holds the metrics of a run ({METRICS}) but no {CHECKPOINT}, so that "
            "run cannot be continued; pass --overwrite to replace it, or another --out")


class FolderLock:
    """An exclusive lock on a run folder, held while a run writes there.

    flock() on OUT/.gpucnn.lock: the kernel drops it when the process dies (even
    with kill -9), so a crashed run never leaves the folder locked."""

    def __init__(self, path):
        self.folder = pathlib.Path(path)
        self.path = self.folder / LOCK
        self.fd = None

    def acquire(self):
        import fcntl
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderError(f"another gpucnn run ({owner}) is writing to {self.folder}; "
                                     "wait for it or pass another --out") from None
            try:  # the holder before us may have removed the file: lock the one on disk
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def claim(path, *, resuming_here=False, overwrite=False):
    """Check, lock and prepare a run folder; returns the held FolderLock.

    A folder that holds a run is refused unless the run resumes there or
    overwrite is set (its run files are then removed); one without work in it
    (see holds_run) is reused. Temporary checkpoint
    files left by a killed run are removed."""
    path = check_writable(path)
    lock = FolderLock(path).acquire()
    try:
        found = holds_run(path)
        if found and not resuming_here:
            if not overwrite:
                raise RunFolderError(_refuse_taken(path, found))
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (path / name).unlink()
        elif not found:  # at most the empty metrics file of a run that saved nothing
            with contextlib.suppress(FileNotFoundError):
                (path / METRICS).unlink()
        for stale in [*path.glob(CHECKPOINT + ".tmp-*"), *path.glob(METRICS + ".tmp-*")]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


def write_metrics(path, history):
    """OUT/metrics.jsonl, one line per finished epoch, rewritten from the history the
    checkpoint holds (atomically), so it never has a duplicate, a gap or a torn line."""
    target = pathlib.Path(path) / METRICS
    tmp = target.with_name(f"{METRICS}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def disk_full(error, what, survivor):
    """A DiskFullError for an OSError raised while writing `what`, saying which
    checkpoint survives; None when the error is not a full disk."""
    if not isinstance(error, OSError) or error.errno not in DISK_FULL:
        return None
    return DiskFullError(f"no space left to write {what} ({error.strerror}); free some space "
                         f"and run again. {survivor}")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; handled exactly like Ctrl-C (checkpoint, then stop)."""


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM while training. Between steps they raise at once
    (KeyboardInterrupt, Terminated); inside ``with interrupts.step():`` they wait for
    the step's end, so that the weights, the optimizer's state, the BN statistics and
    the random and schedule states the checkpoint saves are all those of whole steps:
    a signal in the middle of optimizer.step() would otherwise leave some weights
    updated and others not. A second signal inside the same step (a step that hangs)
    raises at once and sets cut_short: that step's state is not whole, not to be saved."""

    def __init__(self):
        self.in_step, self.pending, self.cut_short = False, None, False

    def handler(self, signum, frame):
        stop = KeyboardInterrupt() if signum == signal.SIGINT else Terminated(f"signal {signum}")
        if self.in_step:
            if self.pending is None:
                self.pending = stop
                return
            self.cut_short = True
        raise stop

    @contextlib.contextmanager
    def step(self):
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
            stop, self.pending = self.pending, None
        if stop is not None:
            raise stop


@contextlib.contextmanager
def interrupts(kind=Interrupts):
    """Install the handler of an Interrupts (or of the subclass `kind`) for SIGINT
    and SIGTERM while training and yield it; the previous handlers come back at the
    end. Only the main thread can install signal handlers (and receives signals);
    elsewhere the steps are not guarded. A signal the parent process ignores
    (SIG_IGN, as a shell does for a job started with &) stays ignored."""
    guard = kind()
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, guard.handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield guard
    finally:
        for sig, handler in previous.items():
            # None: a handler installed from C, not restorable
            if handler is not None and not getattr(guard, "stopping", False):
                signal.signal(sig, handler)


@contextlib.contextmanager
def writing(what, survivor):
    """Turn an OSError while writing `what` into one clear line: a full disk names
    the checkpoint that survives (survivor() says which), anything else the file."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (DiskFullError, RunFolderError)):
            raise
        full = disk_full(e, what, survivor())
        if full is not None:
            raise full from None
        raise RunFolderError(f"cannot write {what}: {e.strerror or e}. {survivor()}") from None
