"""The CPU threads that gpucnn's NumPy path spreads its batch work over.

NumPy runs an operation on one core (its BLAS aside), and the BLAS splits a
matrix product well only when it is large: the CPU convolution passes are loops
over batch chunks (an im2col copy and a cache-sized matrix product each), too
small for the BLAS's own threads to speed them up. Here the chunks are
handed out instead, in contiguous blocks, one block a thread; NumPy's copies,
element-wise loops and BLAS calls release the GIL, so the blocks run side by side.
Meanwhile the BLAS is held to one thread (threadpoolctl), so that the cores are
not oversubscribed.

What each chunk computes, and the order in which callers add chunk results up,
do not depend on the thread count: results are bitwise the same with any.

The count defaults to the BLAS's own thread count when first asked (which
honours OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and the like), as PyTorch's
defaults to the cores; `gpucnn.set_num_threads` changes it.
"""
import contextlib
import ctypes
import os
import platform
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy

from ... import validate

# One section at a time holds the threads (a training step, or a single pass);
# re-entrant, so that the passes inside a step's section go straight through.
_lock = threading.RLock()
_this_thread = threading.local()  # whether in a block; its scratch buffers
_state = {"threads": None, "pool": None, "controller": None, "modules": 0, "held": 0}


def blas_threads():
    """The number of threads the BLAS behind NumPy uses (the order of a matrix
    product's sums, hence its last bits, depends on it), or None if unknown."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        if counts:
            return max(counts)
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def keep_freed_memory():
    """Have glibc's malloc keep the memory a process frees for its next allocations:
    a training step frees and allocates the same tens of MB every step, and memory
    given back to the system faults in again page by page, a sizeable share of a
    CPU step's time (docs/benchmarks.md). For processes that are a training run
    (`gpucnn train`): it changes the allocator of the whole process. True when
    applied; False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # malloc.h
    # never trim the heap; up to glibc's limit (32 MiB on 64-bit) from the heap, not
    # mmap; one arena, so that gpucnn's worker threads reuse what the main thread freed
    largest = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long) if ctypes.sizeof(
        ctypes.c_void_p) == 8 else 512 * 1024
    applied = [mallopt(option, value) == 1 for option, value in
               ((M_TRIM_THRESHOLD, 1 << 30), (M_MMAP_THRESHOLD, largest), (M_ARENA_MAX, 1))]
    return all(applied)


def get_num_threads():
    """How many threads gpucnn's CPU passes use (gpucnn.get_num_threads)."""
    if _state["threads"] is None:
        _state["threads"] = max(1, blas_threads() or 1)
    return _state["threads"]


def step_blas_threads():
    """The BLAS threads a CPU training step's matrix products run with: one where
    gpucnn spreads the step over its own threads, else the BLAS's count (or None if
    unknown). A run repeats bit for bit where this is the same."""
    return 1 if get_num_threads() > 1 else blas_threads()


def set_num_threads(n):
    """Use n threads for gpucnn's CPU passes (as torch.set_num_threads); 1 runs
    them in the calling thread with the BLAS's own threads."""
    n = validate.integer(n, "set_num_threads: num_threads", 1, what="an int >= 1")
    if getattr(_this_thread, "active", False):  # it would wait for itself
        raise RuntimeError("set_num_threads was called inside a block of gpucnn's own "
                           "threads; call it outside gpucnn's passes")
    with _lock:
        pool, _state["pool"] = _state["pool"], None
        _state["threads"] = n
    if pool is not None:
        pool.shutdown(wait=True)


def _blocks(items, n):
    """items cut into n contiguous blocks whose lengths differ by at most one."""
    q, r = divmod(len(items), n)
    cuts = [i * q + min(i, r) for i in range(n + 1)]
    return [items[a:b] for a, b in zip(cuts, cuts[1:])]


def splits(xp):
    """Whether work on xp's arrays is spread over threads here: NumPy arrays, more
    than one thread, and not already inside one of the threads' blocks."""
    return (xp is numpy and get_num_threads() > 1
            and not getattr(_this_thread, "active", False))


@contextlib.contextmanager
def section(xp=numpy):
    """Hold the threads, and the BLAS to one thread, for a stretch of work on xp's
    arrays (a training step): with the BLAS's threads left running between its
    passes, they spin and take the cores the blocks need, and the step runs slower
    than on one thread. Passes outside a section hold the BLAS themselves, pass by
    pass."""
    if not splits(xp):
        yield
        return
    with _lock:
        if _state["held"]:
            yield
            return
        with _controller().limit(limits=1, user_api="blas"):
            _state["held"] += 1
            try:
                yield
            finally:  # (a child forked inside the section has started from 0)
                _state["held"] = max(0, _state["held"] - 1)


def _controller():
    """threadpoolctl's view of the thread pools loaded, kept (building it scans the
    loaded libraries, too slow to do at every pass) until a module is imported: an
    import may load another BLAS (SciPy brings its own OpenBLAS), which a view from
    before would not hold to one thread."""
    modules = len(sys.modules)
    if _state["controller"] is None or _state["modules"] != modules:
        from threadpoolctl import ThreadpoolController
        _state["controller"], _state["modules"] = ThreadpoolController(), modules
    return _state["controller"]


def _run_blocks(fn, blocks):
    # the caller runs the first block itself; the pool the others
    if _state["pool"] is None:
        _state["pool"] = ThreadPoolExecutor(get_num_threads() - 1,
                                            thread_name_prefix="gpucnn-cpu")
    with section():
        futures = [_state["pool"].submit(_in_block, fn, block) for block in blocks[1:]]
        try:
            first = _in_block(fn, blocks[0])
        finally:
            wait(futures)  # no worker may still write into the caller's arrays
    return [first] + [f.result() for f in futures]


def _in_block(fn, block):
    # every thread is busy: work asked for inside a block is done there, inline
    before, _this_thread.active = getattr(_this_thread, "active", False), True
    try:
        return fn(block)
    finally:
        _this_thread.active = before


def map_blocks(fn, items, at_least=1):
    """[fn(block) for block in blocks], blocks being `items` (a sequence) cut into
    as many contiguous blocks as there are threads (fewer with fewer items, none
    shorter than at_least items), run side by side. fn must only write where no
    other block writes."""
    if len(items) == 0:
        return []
    if not splits(numpy) or len(items) < 2 * at_least:
        return [fn(items)]
    with _lock:  # set_num_threads may have run meanwhile
        n = min(get_num_threads(), len(items) // at_least)
        if n <= 1:
            return [fn(items)]
        return _run_blocks(fn, _blocks(items, n))


def map_ranges(fn, count, at_least=1):
    """fn(start, stop) for contiguous ranges splitting range(count), one a thread
    (each at least at_least long), side by side; the results in order."""
    return map_blocks(lambda block: fn(block.start, block.stop), range(count), at_least)


def ranges(xp, fn, count, at_least=1):
    """map_ranges for work on xp's arrays: shared out between the threads for NumPy
    arrays (splits), else one call fn(0, count) (a GPU's work is queued whole)."""
    if splits(xp):
        return map_ranges(fn, count, at_least)
    return [fn(0, count)]


def rows(xp, fn, out, *arrays):
    """fn(*arrays, out=out) for an element-wise NumPy/CuPy function fn, the rows
    (axis 0) of NumPy arrays shared out between the threads; returns out. An
    array with out's number of rows is cut with it; others (scalars, rows that
    broadcast) go to every block whole."""
    if not splits(xp) or out.ndim == 0:
        return fn(*arrays, out=out)
    cut = [getattr(x, "ndim", 0) == out.ndim and x.shape[0] == out.shape[0] for x in arrays]
    map_ranges(lambda a, b: fn(*(x[a:b] if c else x for x, c in zip(arrays, cut)),
                               out=out[a:b]), out.shape[0])
    return out


def sample_rows(xp, *arrays):
    """The arrays (N, ...) as (N, -1) views, one row a sample, where xp is NumPy and
    every sample of every array is contiguous (a view is then certain); else None.
    NumPy's element-wise loops run an innermost axis at a time: against a per-channel
    or scalar operand broadcast over (N, C, H, W) that is one 7- to 28-value pixel
    row (a scalar operand gets no SIMD loop at all), against a row of C*H*W values a
    whole sample, so BatchNorm's per-channel steps and ReLU's forward run much
    faster on these rows. On a GPU a broadcast is one kernel already."""
    if xp is not numpy or any(a.ndim < 2 or not a.shape[0] or not a[0].flags.c_contiguous
                              for a in arrays):
        return None
    return [a.reshape(a.shape[0], -1) for a in arrays]


def scratch(xp, slot, shape, dtype):
    """An uninitialised work array of this shape and dtype. With gpucnn's CPU threads
    at work (NumPy, 2+ threads) it is the calling thread's own for `slot`, its
    memory kept from call to call: a buffer of a few MB freed after each pass is
    given back to the system by the allocator and faults in again page by page on
    the next (most of all in a worker thread's arena), which costs more than the
    copy into it. Valid until this thread asks for the slot again. Otherwise it is
    allocated afresh: with one thread (the main thread's arena), kept buffers raised
    the page faults instead of lowering them."""
    if xp is not numpy or get_num_threads() == 1:
        return xp.empty(shape, dtype=dtype)
    dtype = numpy.dtype(dtype)
    size = int(numpy.prod(shape)) * dtype.itemsize
    buffers = _this_thread.__dict__.setdefault("scratch", {})
    buf = buffers.get(slot)
    if buf is None or buf.size < size:
        buf = buffers[slot] = numpy.empty(size, numpy.uint8)
    return buf[:size].view(dtype).reshape(shape)


def copyto(xp, out, src, axis=0):
    """out[...] = src (src broadcast to out's shape), NumPy arrays cut along `axis`
    between the threads; returns out."""
    if not splits(xp):
        out[...] = src
        return out
    head = (slice(None),) * axis

    def copy(a, b):
        out[head + (slice(a, b),)] = src[head + (slice(a, b),)]
    map_ranges(copy, out.shape[axis])
    return out


def _forget_threads():
    # a forked child has none of the parent's pool threads: it starts its own
    global _lock
    _lock = threading.RLock()
    _state.update(pool=None, held=0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads)
