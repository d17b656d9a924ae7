"""A CuPy stand-in for the tests: the GPU path as CuPy runs it, on the CPU.

``standin.ndarray`` keeps a NumPy array underneath but behaves like
``cupy.ndarray`` where it matters to gpucnn:

- no implicit conversion to NumPy: ``numpy.asarray``, ``numpy.ascontiguousarray``,
  NumPy ufuncs and arithmetic with a ``numpy.ndarray`` raise TypeError, as in CuPy;
- reductions and scalar indexing give 0-d device arrays, not Python numbers;
- every device->host transfer (``.get()``, ``asnumpy``, ``float()``, ``int()``,
  ``bool()``, ``.item()``, ``.tolist()``, printing) is a synchronisation and is
  counted (``syncs()``, ``count_syncs()``);
- ``RawModule(code=..., options=..., name_expressions=...)`` compiles the
  unedited .cu source with the kernel emulator (tests/emulator), and its
  functions take stand-in arrays, as CuPy's take CuPy arrays;
- ``cuda.runtime``, ``cuda.Event``, ``cuda.Stream`` (stream capture calls do
  nothing), ``cuda.get_elapsed_time``, memory pools and ``random.default_rng``;
- ``recording_host_values()`` lists each device operation with the host values it
  is given (Python numbers, NumPy arrays, kernel arguments): what a CUDA graph
  bakes in at capture, so two steps that must replay one graph must list the same.

The backend is told that this module plays CuPy through its one seam,
``gpucnn.backend.set_cupy_module(standin)`` (the ``standin`` fixture in
tests/conftest.py does that); nothing in gpucnn is patched.
"""
import contextlib
import inspect
import operator
import os
import time
import types
import weakref

import numpy

__version__ = "14.0.0-standin"
_NO_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
                "construct a NumPy array explicitly.")

# --- synchronisation and launch counters -------------------------------------------------

_counts = {"syncs": 0, "launches": 0, "ops": 0, "kernel_s": 0.0}
# array methods and functions that make views or nothing at all: no kernel on a GPU
_NO_KERNEL = {"reshape", "transpose", "view", "squeeze", "swapaxes", "empty", "empty_like",
              "shape", "ndim", "result_type", "dtype", "broadcast_to", "expand_dims"}


def syncs():
    """How many device->host synchronisations happened so far."""
    return _counts["syncs"]


def launches():
    """How many RawModule kernels were launched so far."""
    return _counts["launches"]


def kernel_seconds():
    """Wall time spent running emulated RawModule kernels (the GPU's share of a step)."""
    return _counts["kernel_s"]


def ops():
    """How many device operations (each a kernel launch or a copy in CuPy) ran so far:
    the element-wise ops, reductions, copies and RawModule launches."""
    return _counts["ops"]


def _sync():
    _counts["syncs"] += 1


_recorders = []  # the lists of recording_host_values() blocks now open


def _describe(value):
    """A device array by its shape and dtype, a host value by its value."""
    if isinstance(value, ndarray):
        return ("device", value.shape, str(value.dtype))
    if isinstance(value, numpy.ndarray):
        return ("host", value.shape, str(value.dtype), value.tobytes())
    if isinstance(value, numpy.generic):
        return ("host", str(value.dtype), value.item())
    if isinstance(value, (tuple, list)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, slice):
        return ("slice", _describe(value.start), _describe(value.stop), _describe(value.step))
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, complex, str)):
        return value
    if isinstance(value, (numpy.dtype, type)):
        return str(value)
    return type(value).__name__


def _note(name, *args, **kwargs):
    if _recorders:
        entry = (name, _describe(args), tuple(sorted((k, _describe(v))
                                                     for k, v in kwargs.items())))
        for ops in _recorders:
            ops.append(entry)


@contextlib.contextmanager
def recording_host_values():
    """with recording_host_values() as ops: ...; ops lists (name, arguments) of every
    device operation inside the block, device arrays described by shape and dtype,
    host values (numbers, NumPy arrays, kernel scalars) by their value: what a
    captured CUDA graph would keep fixed."""
    ops = []
    _recorders.append(ops)
    try:
        yield ops
    finally:
        _recorders.remove(ops)


@contextlib.contextmanager
def count_syncs():
    """with count_syncs() as n: ...; n() is the number of syncs inside the block so far."""
    start = _counts["syncs"]
    yield lambda: _counts["syncs"] - start


# --- the array type -------------------------------------------------------------------------


def _unwrap(value, host_ok=False, what="argument"):
    """A stand-in array's NumPy array; NumPy arrays refused unless host_ok (host->device)."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, numpy.ndarray) and not host_ok:
        raise TypeError(f"Unsupported type {type(value)} ({what}): CuPy does not mix device "
                        "arrays with numpy.ndarray")
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(v, host_ok, what) for v in value)
    return value


def _wrap(value):
    if isinstance(value, numpy.ndarray):
        return ndarray(value)
    if isinstance(value, numpy.generic):
        return ndarray(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _binary(op):
    def forward(self, other):
        _counts["ops"] += 1
        _note(op.__name__, self, other)
        return _wrap(op(self._a, _unwrap(other, what="operand")))

    def reflected(self, other):
        _counts["ops"] += 1
        _note(op.__name__, other, self)
        return _wrap(op(_unwrap(other, what="operand"), self._a))
    return forward, reflected


def _inplace(op):
    def method(self, other):
        _counts["ops"] += 1
        _note(op.__name__, self, other)
        op(self._a, _unwrap(other, what="operand"))  # numpy's in-place op: views stay views
        return self
    return method


class ndarray:
    """A device array: NumPy underneath, CuPy's rules on top."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100
    __array_ufunc__ = None  # numpy ufuncs (and ndarray <op> ndarray) raise TypeError

    def __init__(self, a):
        if not isinstance(a, numpy.ndarray):  # numpy's 0-d results are scalars
            a = numpy.asarray(a)
        self._a = a
        if a.base is None:
            _pool._track(a)

    # implicit conversions: refused, as in CuPy
    def __array__(self, *args, **kwargs):
        raise TypeError(_NO_IMPLICIT)

    def __array_function__(self, func, types, args, kwargs):
        ours = globals().get(func.__name__)
        if ours is None or not callable(ours):
            return NotImplemented
        return ours(*args, **kwargs)

    # explicit transfers: counted
    def get(self, stream=None, out=None):
        _sync()
        if out is not None:
            out[...] = self._a
            return out
        return self._a.copy()

    def item(self, *args):
        _sync()
        return self._a.item(*args)

    def tolist(self):
        _sync()
        return self._a.tolist()

    def __float__(self):
        _sync()
        return float(self._a)

    def __int__(self):
        _sync()
        return int(self._a)

    def __index__(self):
        _sync()
        return operator.index(self._a)

    def __bool__(self):
        _sync()
        return bool(self._a)

    def __complex__(self):
        _sync()
        return complex(self._a)

    def __repr__(self):
        _sync()
        return repr(self._a).replace("array(", "standin.array(", 1)

    def __str__(self):
        _sync()
        return str(self._a)

    def __format__(self, spec):
        _sync()
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    base = property(lambda self: None if self._a.base is None else ndarray(self._a.base))
    device = property(lambda self: cuda.Device(0))

    @property
    def data(self):
        return cuda.MemoryPointer(self._a.ctypes.data)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(numpy.asarray(v)) for v in self._a)

    def __getitem__(self, key):
        key = _unwrap(key, host_ok=True, what="index")
        if isinstance(key, (numpy.ndarray, list)) or (isinstance(key, tuple) and any(
                isinstance(k, (numpy.ndarray, list)) for k in key)):
            _counts["ops"] += 1  # advanced indexing gathers: a kernel; slicing is a view
        return _wrap(self._a[key])

    def __setitem__(self, key, value):
        _counts["ops"] += 1
        _note("setitem", self, key, value)
        self._a[_unwrap(key, host_ok=True, what="index")] = _unwrap(value, host_ok=True)

    def __getattr__(self, name):
        # the remaining ndarray methods (reshape, sum, astype, ...): device in, device out
        method = getattr(numpy.ndarray, name, None)
        if method is None or not callable(method) or name.startswith("_") or name in (
                "tobytes", "tofile", "dump", "dumps", "__array__"):
            raise AttributeError(f"standin.ndarray has no attribute {name!r}")
        bound = getattr(self._a, name)

        def call(*args, **kwargs):
            if name not in _NO_KERNEL and not (name == "astype" and kwargs.get("copy") is False
                                                   and numpy.dtype(args[0]) == self._a.dtype):
                _counts["ops"] += 1
                _note(name, self, *args, **kwargs)
            return _wrap(bound(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))
        return call

    def __neg__(self):
        _counts["ops"] += 1
        return ndarray(-self._a)

    def __pos__(self):
        return ndarray(+self._a)

    def __abs__(self):
        _counts["ops"] += 1
        return ndarray(abs(self._a))

    def __invert__(self):
        _counts["ops"] += 1
        return ndarray(~self._a)

    def __reduce__(self):
        raise TypeError("standin arrays are not pickled; .get() them first")


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv),
                   ("mod", operator.mod), ("pow", operator.pow), ("matmul", operator.matmul),
                   ("and", operator.and_), ("or", operator.or_), ("xor", operator.xor),
                   ("lshift", operator.lshift), ("rshift", operator.rshift)]:
    _f, _r = _binary(_op)
    setattr(ndarray, f"__{_name}__", _f)
    setattr(ndarray, f"__r{_name}__", _r)
    setattr(ndarray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_name}__", _binary(getattr(operator, _name))[0])
ndarray.__hash__ = None


# --- module functions: NumPy's, device in, device out ------------------------------------

def asarray(a, dtype=None, order=None):
    """Device arrays as they are (or cast); host data copied to the device."""
    if isinstance(a, ndarray):
        if (dtype is None or numpy.dtype(dtype) == a.dtype) and order is None:
            return a
        return ndarray(numpy.asarray(a._a, dtype=dtype, order=order))
    _counts["ops"] += 1
    _note("asarray", a, dtype=dtype)
    return ndarray(numpy.array(_unwrap(a, host_ok=True), dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    _note("array", a, dtype=dtype)
    return ndarray(numpy.array(_unwrap(a, host_ok=True), dtype=dtype, copy=copy, order=order,
                               ndmin=ndmin))


def asnumpy(a, stream=None, out=None):
    """Device -> host (a synchronisation); NumPy input is returned as is, as in CuPy."""
    if isinstance(a, ndarray):
        return a.get(out=out)
    return numpy.asarray(a)


def get_array_module(*args):
    return globals()["_this"] if any(isinstance(a, ndarray) for a in args) else numpy


def shape(a):
    return a.shape


def ndim(a):
    return a.ndim


def empty(shape, dtype=float, order="C"):
    """Uninitialised device memory: poisoned (NaN, or the integer type's extreme), as
    a GPU hands back whatever the previous kernel left, so an unwritten output shows."""
    from emulator.poisoned import poison
    return ndarray(poison(numpy.empty(shape, dtype=dtype, order=order)))


def empty_like(prototype, dtype=None, order="K", subok=True, shape=None):
    from emulator.poisoned import poison
    return ndarray(poison(numpy.empty_like(_unwrap(prototype), dtype=dtype, order=order,
                                           shape=shape)))


# The emulator's thread order for RawModule launches, and the order each launch is
# compared with bitwise (None: no comparison); see tests/emulator. set_emulator_order
# changes them for the launches that follow.
_order = {"order": 0, "compare_order": None}


@contextlib.contextmanager
def emulator_order(order, compare_order=None):
    """with emulator_order(2, 1): launches run in thread order 2, each checked bitwise
    against order 1 (a race or a schedule-dependent sum raises OrderError)."""
    previous = dict(_order)
    _order.update(order=order, compare_order=compare_order)
    try:
        yield
    finally:
        _order.update(previous)


def _delegate(name, target):
    def function(*args, **kwargs):
        if name not in _NO_KERNEL:
            _counts["ops"] += 1
            _note(name, *args, **kwargs)
        args = _unwrap(list(args), what=f"standin.{name}")
        kwargs = {k: _unwrap(v, what=f"standin.{name}") for k, v in kwargs.items()}
        return _wrap(target(*args, **kwargs))
    function.__name__ = name
    return function


def __getattr__(name):
    """numpy's dtypes and constants as they are; numpy's functions wrapped to take and
    give device arrays (and to refuse numpy arrays, as CuPy does)."""
    target = getattr(numpy, name)  # AttributeError for a name NumPy lacks too
    if isinstance(target, (type, numpy.dtype, float, int)) or not callable(target):
        return target
    function = _delegate(name, target)
    globals()[name] = function
    return function


lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
    as_strided=lambda x, shape=None, strides=None: ndarray(
        numpy.lib.stride_tricks.as_strided(_unwrap(x), shape=shape, strides=strides))))


# --- random ------------------------------------------------------------------------------


class Generator:
    """cupy.random.Generator: numbers drawn on the device. Its bit stream is not NumPy's
    default (CuPy's is XORWOW, this one Philox), so code that draws on the device draws
    other numbers than on the CPU here too, as it would on a GPU."""

    def __init__(self, bit_generator):
        self._g = numpy.random.Generator(bit_generator)

    def __getattr__(self, name):
        method = getattr(self._g, name)

        def draw(*args, **kwargs):
            _note(f"random.{name}", *args, **kwargs)
            return _wrap(numpy.asarray(method(*args, **kwargs)))
        return draw


random = types.SimpleNamespace(
    default_rng=lambda seed=None: Generator(numpy.random.Philox(seed)), Generator=Generator)


# --- memory pools ---------------------------------------------------------------------------


class MemoryPool:
    """cupy.cuda.MemoryPool's statistics: bytes held by live stand-in arrays."""

    def __init__(self):
        self._live = weakref.WeakValueDictionary()
        self._peak = 0

    def _track(self, a):
        if a.nbytes:
            self._live[id(a)] = a
            self._peak = max(self._peak, self.used_bytes())

    def malloc(self, size):
        return cuda.MemoryPointer(0)

    def used_bytes(self):
        return sum(a.nbytes for a in list(self._live.values()))

    def total_bytes(self):
        return max(self._peak, self.used_bytes())

    def free_bytes(self):
        return self.total_bytes() - self.used_bytes()

    def free_all_blocks(self, stream=None):
        self._peak = self.used_bytes()

    def n_free_blocks(self):
        return 0

    def set_limit(self, size=None, fraction=None):
        pass

    def get_limit(self):
        return 0


class PinnedMemoryPool:
    def n_free_blocks(self):
        return 0

    def free_all_blocks(self):
        pass


_pool = MemoryPool()
_pinned = PinnedMemoryPool()


def get_default_memory_pool():
    return _pool


def get_default_pinned_memory_pool():
    return _pinned


# --- cuda: runtime, events, streams, graphs, RawModule --------------------------------------


class CUDARuntimeError(RuntimeError):
    pass


_PROPERTIES = {"name": b"gpucnn CuPy stand-in (CPU, kernel emulator)", "major": 9, "minor": 0,
               "totalGlobalMem": 8 << 30, "multiProcessorCount": 4,
               "sharedMemPerBlock": 48 << 10, "sharedMemPerBlockOptin": 227 << 10,
               "maxThreadsPerBlock": 1024, "warpSize": 32, "regsPerBlock": 65536,
               "clockRate": 1_000_000, "l2CacheSize": 1 << 20}


def _get_device():
    return Device.current


def _get_device_count():
    # one GPU, or STANDIN_GPUS of them for ranks that each need one of their own
    return int(os.environ.get("STANDIN_GPUS", "1"))


def _get_device_properties(device):
    if not 0 <= device < _get_device_count():
        raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {device}")
    return dict(_PROPERTIES)


class Device:
    current = 0  # the device use() made current

    def __init__(self, device=0):
        self.id = device

    def synchronize(self):
        _sync()

    def use(self):
        Device.current = self.id

    @property
    def compute_capability(self):
        return f"{_PROPERTIES['major']}{_PROPERTIES['minor']}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class MemoryPointer:
    def __init__(self, ptr):
        self.ptr = ptr


class Event:
    """Host timestamps; record/synchronize as CuPy's (synchronize is a host wait)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        _sync()

    def query(self):
        return True

    @property
    def done(self):
        return True


def _get_elapsed_time(start, end):
    if start._t is None or end._t is None:
        raise CUDARuntimeError("cudaErrorInvalidResourceHandle: an event was not recorded")
    return (end._t - start._t) * 1e3


class Graph:
    """What Stream.end_capture returns. The stand-in captures nothing, so there is
    nothing to replay; launch() counts how often it was asked to."""

    def __init__(self):
        self.launched = 0

    def launch(self, stream=None):
        self.launched += 1

    def upload(self, stream=None):
        pass


class Stream:
    """One stream of work; the stand-in runs everything at once, on the host."""

    null = None
    captures = 0  # how many captures were begun (the graph tests read this)

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self._capturing = False

    @property
    def ptr(self):
        """The cudaStream_t handle NCCL takes: here the stream's id, the null stream's 0."""
        return 0 if self is Stream.null else id(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self

    def synchronize(self):
        _sync()

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    def begin_capture(self, mode=None):
        if self._capturing:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
        Stream.captures += 1
        self._capturing = True

    def is_capturing(self):
        return self._capturing

    def end_capture(self):
        if not self._capturing:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        self._capturing = False
        return Graph()


Stream.null = Stream(null=True)


def _get_current_stream(device=None):
    return Stream.null


@contextlib.contextmanager
def _using_allocator(allocator=None):
    yield


class RawKernel:
    """A function of a RawModule: unwraps stand-in arrays and launches the emulated kernel."""

    def __init__(self, function):
        self._f = function
        self.name = function.name

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._f.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        self._f.max_dynamic_shared_size_bytes = value

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        values = []
        for i, a in enumerate(args):
            if isinstance(a, numpy.ndarray):
                raise TypeError(f"{self.name}: argument {i} is a numpy.ndarray; CuPy kernels "
                                "take device arrays")
            values.append(a._a if isinstance(a, ndarray) else a)
        _counts["launches"] += 1
        _counts["ops"] += 1
        _note(self.name, tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)
        if not all(int(g) > 0 for g in grid) or not all(int(b) > 0 for b in block):
            raise CUDARuntimeError(f"{self.name}: invalid grid {tuple(grid)} or block "
                                   f"{tuple(block)} (cudaErrorInvalidConfiguration)")
        module = self._f._module  # the emulator reads its thread orders from here
        module.order, module.compare_order = _order["order"], _order["compare_order"]
        t0 = time.perf_counter()
        self._f(grid, block, values, shared_mem=shared_mem)
        _counts["kernel_s"] += time.perf_counter() - t0  # emulated GPU time, not host time


def _emulated_module(code, options, name_expressions):
    from emulator import EmulatedModule
    params = inspect.signature(EmulatedModule).parameters
    if "options" in params:
        return EmulatedModule(code, name_expressions, options=tuple(options))
    defines = [o for o in options if o.startswith("-D")]
    if defines:
        raise NotImplementedError(f"this emulator takes no compile options, got {defines}")
    return EmulatedModule(code, name_expressions)


class RawModule:
    """cupy.RawModule(code=..., options=..., name_expressions=...), served by the emulator."""

    _cache = {}

    def __init__(self, code=None, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False,
                 name_expressions=None, jitify=False):
        if code is None:
            raise NotImplementedError("the stand-in's RawModule takes code=, not path=")
        names = tuple(name_expressions or ())
        key = (code, tuple(options), names)
        if key not in RawModule._cache:
            RawModule._cache[key] = _emulated_module(code, tuple(options), names)
        self._module = RawModule._cache[key]

    def get_function(self, name):
        return RawKernel(self._module.get_function(name))


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDevice=_get_device, getDeviceCount=_get_device_count,
                                  getDeviceProperties=_get_device_properties,
                                  CUDARuntimeError=CUDARuntimeError, is_hip=False,
                                  deviceSynchronize=_sync, runtimeGetVersion=lambda: 12090,
                                  driverGetVersion=lambda: 12090),
    Device=Device, Event=Event, Stream=Stream, Graph=Graph, MemoryPool=MemoryPool,
    MemoryPointer=MemoryPointer, get_elapsed_time=_get_elapsed_time,
    get_current_stream=_get_current_stream, using_allocator=_using_allocator,
    set_allocator=lambda allocator=None: None, CUDARuntimeError=CUDARuntimeError)
cuda.runtime.CUDARuntimeError = CUDARuntimeError


def _this_module():
    import sys
    return sys.modules[__name__]


_this = _this_module()
