"""The MPI world a process belongs to: its rank, its node-local rank, and the host
collectives the application coordinates with.

A process is part of a world of more than one only when an MPI launcher started it
(``mpiexec``, ``mpirun``, ``srun`` with PMI): that is read from the launcher's
environment variables, and only then is mpi4py imported. Any other process is a
world of one, whose collectives return their argument without touching MPI, so a
single process runs exactly the code it ran before gpucnn knew about MPI.

Every collective here is nonblocking underneath and waited for with a deadline
(``timeout`` seconds, 300 by default). While it waits, a rank answers the
questions of the others (which collective are you in?). A rank whose deadline
passes asks every other rank; those that do not answer within a short grace
are the ones named in the one line that ends the world (MPI_Abort), and the
lowest-numbered rank that did answer is the one that prints it, so it is
printed once. See docs/distributed.md.
"""
import dataclasses
import os
import pickle
import sys
import threading
import time

import numpy

from .. import validate
from ..errors import UserError

DEFAULT_TIMEOUT = 300.0  # seconds a collective may take before the world is ended
ABORT_CODE = 3  # the exit status of a world ended by a timeout
# Seconds a wait polls without sleeping before it backs off. MPICH moves a
# nonblocking collective on only inside MPI calls, and a sleep costs 50 us or more
# even when 1 us is asked for: sleeping from the start made a 1.8 MB gradient
# all-reduce take 1.1-1.8 ms that a blocking one does in 0.4-0.6 ms.
SPIN_S = 5e-3

# Variables only an MPI launcher sets: Open MPI's mpirun, MPICH's and Intel MPI's
# hydra (PMI_*), PMIx launchers (Open MPI 5, srun --mpi=pmix), srun --mpi=pmi2.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK",
                      "PMIX_RANK", "MPI_LOCALNRANKS", "PMI_FD", "PMI_PORT")
# where a launcher states the world's size: a size of 1 needs no MPI at all
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")

_TAG_QUERY, _TAG_REPLY = 30_001, 30_002  # the timeout's questions and answers, on the control comm


class DistributedError(UserError, RuntimeError):
    """The world cannot be formed (a launcher without mpi4py, srun without PMI) or
    a distributed argument is wrong for it."""


def launched_by_mpi(environ=None):
    """Whether an MPI launcher started this process with a world of more than one
    (or of an unstated size). GPUCNN_MPI=0 says never, GPUCNN_MPI=1 always."""
    env = os.environ if environ is None else environ
    forced = env.get("GPUCNN_MPI", "")
    if forced in ("0", "1"):
        return forced == "1"
    for name in SIZE_VARIABLES:
        if env.get(name, "").strip().isdigit():
            return int(env[name]) > 1
    if any(name in env for name in LAUNCHER_VARIABLES):
        return True
    # srun without --mpi: every task would be a world of one; _mpi_world says so
    return "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ranks of a data-parallel run.

    rank, size: in MPI_COMM_WORLD; local_rank, local_size: among the ranks on this
    node (MPI's shared-memory split), which pick the GPU. comm: a duplicate of
    COMM_WORLD for the host collectives below; grad_comm: another for the gradient
    all-reduce on the CPU (so the two streams of collectives never interleave
    differently on two ranks); local_comm: the node's ranks. All None in a world
    of one. timeout: seconds a collective may take before the world is ended.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    comm: object = None
    grad_comm: object = None
    local_comm: object = None
    timeout: float = DEFAULT_TIMEOUT
    _watch: object = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def is_distributed(self):
        return self.size > 1

    @property
    def is_root(self):
        return self.rank == 0

    def device_index(self, num_gpus):
        """The GPU this rank takes among the node's num_gpus: local_rank mod num_gpus."""
        num_gpus = validate.positive_int(num_gpus, "num_gpus", error=DistributedError)
        return self.local_rank % num_gpus

    # --- host collectives ------------------------------------------------------------

    def allreduce_host(self, value, op="sum"):
        """op ('sum', 'max' or 'min') of value over the ranks, on every rank: a Python
        int or float gives the same type back, a NumPy array a new array."""
        validate.choice(op, "op", ("sum", "max", "min"), error=DistributedError)
        scalar = not isinstance(value, numpy.ndarray)
        if scalar and not validate.is_real(value):
            raise DistributedError(f"allreduce_host value must be an int, a float or a NumPy "
                                   f"array, got {type(value).__name__}")
        buf = numpy.array([value] if scalar else value, copy=True)
        if self.is_distributed:
            mpi = _mpi()
            out = numpy.empty_like(buf)
            ops = {"sum": mpi.SUM, "max": mpi.MAX, "min": mpi.MIN}
            request = self.comm.Iallreduce(buf, out, op=ops[op])
            self._watch.wait(request, f"allreduce_host({op})")
            buf = out
        return (type(value)(buf[0].item()) if scalar else buf)

    def bcast_host(self, obj, root=0):
        """root's obj (anything picklable) on every rank."""
        root = self._root(root)
        if not self.is_distributed:
            return obj
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == root else b""
        n = numpy.array([len(data)], numpy.int64)
        self._watch.wait(self.comm.Ibcast(n, root=root), "bcast_host")
        buf = bytearray(data) if self.rank == root else bytearray(int(n[0]))
        self._watch.wait(self.comm.Ibcast(buf, root=root), "bcast_host")
        return obj if self.rank == root else pickle.loads(bytes(buf))

    def allgather_host(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (obj picklable)."""
        if not self.is_distributed:
            return [obj]
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        sizes = numpy.empty(self.size, numpy.int64)
        self._watch.wait(self.comm.Iallgather(numpy.array([len(data)], numpy.int64), sizes),
                         "allgather_host")
        buf = bytearray(int(sizes.sum()))
        offsets = numpy.concatenate([[0], numpy.cumsum(sizes)[:-1]])
        request = self.comm.Iallgatherv(bytearray(data), [buf, (sizes.tolist(), offsets.tolist())])
        self._watch.wait(request, "allgather_host")
        return [pickle.loads(bytes(buf[o:o + s])) for o, s in zip(offsets, sizes)]

    def barrier(self):
        """Wait until every rank has come here (with the timeout)."""
        if self.is_distributed:
            self._watch.wait(self.comm.Ibarrier(), "barrier")

    def agree_later(self, flag):
        """Start the max of an int flag over the ranks without waiting for it: one
        small nonblocking all-reduce, cheap to start once a step (a stop request,
        say) and read a step later with handle.result(), so the host never waits
        for the GPU to agree. The same calls in the same order on every rank."""
        value = validate.integer(flag, "flag", error=DistributedError)
        if not self.is_distributed:
            return Agreement(None, numpy.array([value], numpy.int64), None)
        out = numpy.empty(1, numpy.int64)
        request = self.comm.Iallreduce(numpy.array([value], numpy.int64), out, op=_mpi().MAX)
        return Agreement(request, out, self._watch)

    def abort(self, message, code=1):
        """End every rank now: one line on stderr (this rank's message), then
        MPI_Abort; in a world of one, the line then SystemExit(code)."""
        if not self.is_distributed:
            print(f"gpucnn: {message}", file=sys.stderr, flush=True)
            raise SystemExit(code)
        _end_world(message, code)

    def watch(self, what):
        """with world.watch('reading the loss'): a blocking wait that is not an MPI
        call (a GPU synchronisation behind an NCCL all-reduce) ends the world, as a
        collective does, if it lasts longer than the timeout; meanwhile a thread
        answers the other ranks' questions for this rank."""
        return self._watch.watching(what) if self.is_distributed else _NullContext()

    def busy(self, what):
        """with world.busy('writing the checkpoint'): work on this rank alone (a file
        written by rank 0, a dataset decoded) while others may wait for it in a
        collective. A thread answers their questions meanwhile, so that a rank which is
        only slow is named as busy in `what`, never as one that does not answer; the
        work has no deadline of its own (the waiting ranks' deadlines still hold)."""
        return self._watch.watching(what, deadline=False) if self.is_distributed else (
            _NullContext())

    def _root(self, root):
        root = validate.integer(root, "root", 0, error=DistributedError)
        if root >= self.size:
            raise DistributedError(f"root must be a rank in [0, {self.size - 1}], got {root}")
        return root


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Agreement:
    """What world.agree_later returns: done() without waiting, result() waiting
    (with the timeout) for the flag's max over the ranks, an int."""

    def __init__(self, request, out, watch):
        self._request, self._out, self._watch = request, out, watch

    def done(self):
        if self._request is None:
            return True
        finished = self._request.Test()
        if finished:
            self._request = None
        return finished

    def result(self):
        if self._request is not None:
            self._watch.wait(self._request, "agree_later")
            self._request = None
        return int(self._out[0])


class _Watch:
    """Deadlines for one world's waits, and the questions that name who is missing."""

    def __init__(self, comm, rank, size, timeout):
        self.comm, self.rank, self.size, self.timeout = comm, rank, size, timeout
        self.seq = 0  # waits begun so far on this rank: the same count on every rank
        self.what = "nothing"
        self.lock = threading.Lock()  # the watchdog thread and the main thread share the comm
        self.sends = []  # replies still being sent (their buffers must outlive them)
        self.busy = False  # in work of its own (World.busy), not waiting for the others

    def wait(self, request, what):
        """Poll request until it completes; past the deadline, end the world."""
        self.seq += 1
        self.what = what
        now = time.monotonic()
        deadline, spin_until, pause = now + self.timeout, now + SPIN_S, 1e-6
        while True:
            with self.lock:
                if request.Test():
                    self.what = "nothing"
                    return
                self._answer()
            now = time.monotonic()
            if now > deadline:
                self.expire(what)
            if now > spin_until:  # long waits cost no CPU
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

    def _answer(self):
        """Tell each rank that asked which wait this rank is in."""
        mpi = _mpi()
        status = mpi.Status()
        while self.comm.Iprobe(source=mpi.ANY_SOURCE, tag=_TAG_QUERY, status=status):
            self.comm.recv(source=status.Get_source(), tag=_TAG_QUERY)
            self.sends.append(self.comm.isend((self.rank, self.seq, self.what, self.busy),
                                              dest=status.Get_source(), tag=_TAG_REPLY))
        self.sends = [r for r in self.sends if not r.Test()]

    def _ask(self, grace):
        """({rank: (wait count, what)} of the ranks that answer within grace seconds,
        the set of those busy in work of their own)."""
        with self.lock:
            asks = [self.comm.isend(self.seq, dest=r, tag=_TAG_QUERY)
                    for r in range(self.size) if r != self.rank]
        answers, busy = {self.rank: (self.seq, self.what)}, set()
        mpi, status = _mpi(), _mpi().Status()
        end = time.monotonic() + grace
        while time.monotonic() < end and len(answers) < self.size:
            with self.lock:
                self._answer()
                while self.comm.Iprobe(source=mpi.ANY_SOURCE, tag=_TAG_REPLY, status=status):
                    r, seq, what, working = self.comm.recv(source=status.Get_source(),
                                                           tag=_TAG_REPLY)
                    answers[r] = (seq, what)
                    if working:
                        busy.add(r)
            time.sleep(1e-3)
        del asks  # never waited for: a rank that did not answer may never take them
        return answers, busy

    def expire(self, what):
        """The deadline of `what` passed: name the ranks that do not answer, once, and
        end the world."""
        grace = min(5.0, max(0.5, self.timeout / 4))
        answers, busy = self._ask(grace)
        line = _timeout_line(self.rank, self.size, self.timeout, what, self.seq, answers)
        # the lowest rank that answered from a wait reports, alone (a busy one has no
        # deadline that would make it report)
        if min(set(answers) - busy) == self.rank:
            _end_world(line, ABORT_CODE)
        # another rank reports and ends the world; answer its questions meanwhile,
        # and end it here if it has not within a few graces (it may have died since)
        end = time.monotonic() + 4 * grace
        while time.monotonic() < end:
            with self.lock:
                self._answer()
            time.sleep(1e-3)
        _end_world(line, ABORT_CODE)

    def watching(self, what, deadline=True):
        return _Watchdog(self, what, deadline)


class _Watchdog:
    """A thread that, while the main thread is blocked outside MPI, answers the
    other ranks and (with a deadline) ends the world at the deadline."""

    def __init__(self, watch, what, deadline=True):
        self.watch, self.what, self.stop = watch, what, threading.Event()
        self.deadline = deadline

    def __enter__(self):
        self.watch.what, self.watch.busy = self.what, not self.deadline
        self.thread = threading.Thread(target=self._run, name="gpucnn-watchdog", daemon=True)
        self.thread.start()
        return self

    def _run(self):
        deadline = time.monotonic() + self.watch.timeout
        while not self.stop.wait(1e-2):
            with self.watch.lock:
                self.watch._answer()
            if self.deadline and time.monotonic() > deadline:
                self.watch.expire(self.what)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.watch.what, self.watch.busy = "nothing", False
        return False


def _end_world(line, code):
    """Print the line that says why, then MPI_Abort every rank."""
    print(f"gpucnn: {line}", file=sys.stderr, flush=True)
    # the launcher forwards a rank's output through a pipe it stops reading once told
    # to kill the job: give it a moment to pass this line on first
    time.sleep(0.2)
    _mpi().COMM_WORLD.Abort(code)


def _timeout_line(rank, size, timeout, what, seq, answers):
    """The one line that ends a world whose collective timed out."""
    silent = [r for r in range(size) if r not in answers]
    elsewhere = sorted(r for r, (s, w) in answers.items() if (s, w) != (seq, what)
                       and w != "nothing")
    parts = []
    if silent:
        ranks = ", ".join(map(str, silent))
        parts.append(f"rank{'s' if len(silent) > 1 else ''} {ranks} did not answer within "
                     f"{timeout:g} s")
    else:
        parts.append(f"a collective did not complete within {timeout:g} s")
    parts.append(f"(rank {rank} waiting in {what}, collective #{seq})")
    if elsewhere:
        parts.append("; " + ", ".join(f"rank {r} is in {answers[r][1]} #{answers[r][0]}"
                                      for r in elsewhere))
    return " ".join(parts[:2]) + "".join(parts[2:]) + "; ending the run on every rank"


_world = None
_lock = threading.Lock()


def get_world(timeout=None):
    """This process's World, made once: a world of one (no MPI) unless an MPI
    launcher started the process. timeout: seconds a collective may take before
    the world is ended (default 300); given again, it replaces the cached world's."""
    global _world
    if timeout is not None:
        timeout = validate.number(timeout, "timeout", 0, low_open=True, error=DistributedError)
    with _lock:
        if _world is None:
            _world = _mpi_world(timeout or DEFAULT_TIMEOUT) if launched_by_mpi() else World(
                timeout=timeout or DEFAULT_TIMEOUT)
        elif timeout is not None and timeout != _world.timeout:
            if _world._watch is not None:
                _world._watch.timeout = timeout
            _world = dataclasses.replace(_world, timeout=timeout)
        return _world


def _mpi():
    """mpi4py's MPI module (imported on first use: only a world of more than one needs it)."""
    from mpi4py import MPI
    return MPI


def _mpi_world(timeout):
    try:
        mpi = _mpi()
    except ImportError as e:
        raise DistributedError(f"this process was started by an MPI launcher but mpi4py cannot "
                               f"be imported ({e}); install it: python -m pip install mpi4py "
                               "(GPUCNN_MPI=0 runs each process on its own)") from None
    world = mpi.COMM_WORLD
    if world.Get_size() == 1 and "SLURM_STEP_ID" in os.environ:
        raise DistributedError(
            f"srun started {os.environ.get('SLURM_NTASKS')} tasks but each is a world of one: "
            "srun needs --mpi=pmix (or pmi2) to join them into one MPI world")
    local = world.Split_type(mpi.COMM_TYPE_SHARED, key=world.Get_rank())
    comm, grad_comm = world.Dup(), world.Dup()
    watch = _Watch(comm, world.Get_rank(), world.Get_size(), timeout)
    return World(rank=world.Get_rank(), size=world.Get_size(), local_rank=local.Get_rank(),
                 local_size=local.Get_size(), comm=comm, grad_comm=grad_comm, local_comm=local,
                 timeout=timeout, _watch=watch)


def mpi_library_version():
    """The MPI library's one-line version, or None where mpi4py is not importable
    (for ``gpucnn info``). MPI_Get_library_version is legal before MPI_Init: in a
    process no launcher started, mpi4py is imported without starting MPI."""
    try:
        import mpi4py
        if "mpi4py.MPI" not in sys.modules and not launched_by_mpi():
            initialize, mpi4py.rc.initialize = mpi4py.rc.initialize, False
            try:
                from mpi4py import MPI  # noqa: F401
            finally:
                mpi4py.rc.initialize = initialize
        return _mpi().Get_library_version().strip().splitlines()[0]
    except ImportError:
        return None
