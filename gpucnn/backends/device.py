"""Devices and the array module: NumPy on the CPU, CuPy on an NVIDIA GPU
(gpucnn.backend gives these names to the rest of the package).

Every layer is written once against ``xp = get_array_module(...)``. CuPy is
imported lazily, so the package imports and runs where CuPy or a GPU is
missing; asking for ``cuda`` there is an error that says which of the two.
"""
import os
import sys

import numpy

from ..errors import ConfigError, DeviceError

DEVICES = ("cpu", "cuda", "auto")
_cupy = None
_cupy_error = None
_cupy_short = None  # the same in a few words, for the one-line device report
_stand_in = None  # a module playing CuPy (set_cupy_module), or None for the real one


def set_cupy_module(module):
    """Name the module that plays CuPy; None restores the real ``cupy``. Returns the
    previous one, so ``prev = set_cupy_module(m); ...; set_cupy_module(prev)``.

    This is the one seam for test doubles (tests/standin): gpucnn then treats
    ``module.ndarray`` as device arrays, ``module`` as their array module, and
    loads its kernels through ``module.RawModule``. Its stream capture is taken
    to record nothing (graph_capture_replays). Nothing else changes.
    """
    global _stand_in
    previous, _stand_in = _stand_in, module
    return previous


def graph_capture_replays(xp):
    """Whether work captured on a stream of xp is recorded for replay (not run):
    True for CuPy; False for a stand-in, whose capture calls do nothing."""
    return xp is not _stand_in


def _cupy_module():
    """The module playing CuPy if it is imported already (no import, no device query):
    an array of it can only exist once it is."""
    return _stand_in if _stand_in is not None else sys.modules.get("cupy")


PROBE = """template <typename T> __global__ void gpucnn_probe(T* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += T(1);
}"""
_probed = {}  # module -> (module or None, why not in a few words, in full)


def _probe(cupy):
    """Check that a CuPy-like module can run kernels here: a device, CuPy's own
    element-wise kernels (they need the CUDA headers) and one tiny RawModule
    kernel compiled by NVRTC. Returns None, or (what is missing in a few words, in full)."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CuPy raises several kinds here
        text = str(e)
        if "InsufficientDriver" in text or "driver" in text.lower():
            return "no usable NVIDIA driver", (
                f"no usable NVIDIA driver ({text}); install or update the driver "
                "(nvidia-smi should list the GPU)")
        if "NoDevice" in text:
            return "no CUDA device", (f"no CUDA device is visible ({text}); check "
                                      "nvidia-smi and CUDA_VISIBLE_DEVICES")
        return "no usable CUDA device", f"CuPy is installed but no CUDA device is usable: {text}"
    if count < 1:
        return "no CUDA device", ("CuPy is installed but reports no CUDA device (check "
                                  "CUDA_VISIBLE_DEVICES)")
    stage = "CuPy's element-wise kernels"
    try:
        x = cupy.arange(4, dtype=numpy.float32) * 2
        stage = "a RawModule kernel (NVRTC)"
        module = cupy.RawModule(code=PROBE, options=("--std=c++14",),
                                name_expressions=["gpucnn_probe<float>"])
        module.get_function("gpucnn_probe<float>")((1,), (32,), (x, numpy.int32(4)))
        if float(x.sum()) != 16.0:
            return "test kernel wrong", ("a test kernel ran but computed a wrong result; the "
                                         "GPU or driver is faulty")
    except Exception as e:  # noqa: BLE001 - compile and launch errors of every kind
        text = str(e)
        if any(k in text for k in ("cuda_fp16.h", "cannot open source file", "CUDA headers",
                                   "cuda.h", "No such file")):
            first = text.splitlines()[0]
            return "CUDA headers missing", (
                f"the CUDA headers are missing, so {stage} do not compile ({first}); "
                "CuPy 14 needs them: install gpucnn[cuda12] or gpucnn[cuda13] (they bring "
                "cupy-cudaXXx[ctk]) or a CUDA toolkit")
        if "nvrtc" in text.lower() or "compile" in text.lower():
            return "NVRTC error", f"NVRTC could not compile {stage}: {text}"
        return "test kernel failed", f"{stage} failed to run: {type(e).__name__}: {text}"
    return None


def _fix_cublas_workspace():
    """cuBLAS gives the same bits on every stream only with a fixed workspace; the
    CUDA-graph step replays on a side stream and must match the eager steps (a
    resume runs eagerly where the straight run replayed). Before CuPy loads."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _cupy_unprobed():
    """The module playing CuPy, imported but not probed (a process picks its GPU
    before anything runs on one), or None where CuPy is not installed."""
    if _stand_in is not None:
        return _stand_in
    _fix_cublas_workspace()
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def gpu_count():
    """How many CUDA devices this process sees: 0 without CuPy, a driver or a device
    (resolve_device says which). Runs nothing on a device."""
    module = _cupy_unprobed()
    if module is None:
        return 0
    try:
        return int(module.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - CuPy raises several kinds here; _probe names them
        return 0


def use_gpu(index):
    """Make CUDA device `index` (of gpu_count()) this process's current one: before
    anything runs on a GPU, so that every array and kernel of the process is there."""
    count = gpu_count()
    if not 0 <= index < count:
        raise DeviceError(f"GPU index must be in [0, {count}), got {index}")
    _cupy_unprobed().cuda.Device(index).use()


def _import_cupy():
    """Return the module playing CuPy where it can run kernels here, or None;
    remember why not (the check runs once per module and process)."""
    global _cupy, _cupy_error, _cupy_short
    module = _stand_in
    if module is None:
        if _cupy is not None or _cupy_error is not None:
            return _cupy
        _fix_cublas_workspace()
        try:
            import cupy as module
        except ImportError as e:  # not installed
            _cupy_error = (
                f"CuPy is not installed ({e}); install gpucnn with the 'cuda12' or "
                "'cuda13' extra, e.g. pip install 'gpucnn[cuda12]'")
            _cupy_short = "CuPy not installed"
            return None
    if module not in _probed:
        short, why = _probe(module) or (None, None)
        _probed[module] = (None if why else module, short, why)
    usable, short, why = _probed[module]
    if module is not _stand_in:
        _cupy, _cupy_short, _cupy_error = usable, short, why
    return usable


def cuda_available():
    """True where CuPy imports and sees at least one CUDA device."""
    return _import_cupy() is not None


def cuda_unavailable_reason():
    """Why ``cuda`` cannot be used here, or None where it can."""
    if _import_cupy() is not None:
        return None
    return _probed[_stand_in][2] if _stand_in is not None else _cupy_error


def resolve_device(device=None):
    """Turn 'cpu', 'cuda', 'auto' or None (reads GPUCNN_DEVICE, default 'auto')
    into 'cpu' or 'cuda'. Returns (device, reason) where reason says why."""
    source = "argument"
    if device is None:
        device = os.environ.get("GPUCNN_DEVICE", "auto")
        source = "GPUCNN_DEVICE" if "GPUCNN_DEVICE" in os.environ else "default"
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {device!r} (from {source})")
    device = device.lower()
    if device == "cpu":
        return "cpu", f"cpu requested ({source})"
    if device == "cuda":
        if not cuda_available():
            raise DeviceError(f"device 'cuda' requested ({source}) but "
                               f"{cuda_unavailable_reason()}")
        return "cuda", f"cuda requested ({source})"
    if cuda_available():
        return "cuda", "auto: a CUDA device was found"
    short = _probed[_stand_in][1] if _stand_in is not None else _cupy_short
    return "cpu", short  # e.g. "CuPy not installed"; the details: cuda_unavailable_reason()


def is_cupy_array(a):
    """True for an array of the module playing CuPy, recognised by its type; needs
    no initialisation (a user's first call may be F.conv2d(cupy_array, ...))."""
    module = _cupy_module()
    return module is not None and isinstance(a, module.ndarray)


def device_of(a):
    """'cuda' for a CuPy array, 'cpu' for anything else."""
    return "cuda" if is_cupy_array(a) else "cpu"


def get_array_module(*arrays):
    """numpy or cupy, whichever holds the arrays; arrays on both is an error."""
    devices = {device_of(a) for a in arrays if a is not None}
    if len(devices) > 1:
        raise ValueError("arrays are on different devices (cpu and cuda); move them "
                         "to one device first (gpucnn.backend.to_device)")
    return _cupy_module() if devices == {"cuda"} else numpy


def xp_for(device):
    """The array module of a resolved device name."""
    if device == "cuda":
        if not cuda_available():
            raise DeviceError(f"device 'cuda' is not usable: {cuda_unavailable_reason()}")
        return _import_cupy()
    if device == "cpu":
        return numpy
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def to_device(a, device):
    """Copy (only when needed) an array to 'cpu' or 'cuda'."""
    if a is None:
        return None
    if device == "cpu":
        return a.get() if is_cupy_array(a) else numpy.asarray(a)
    return xp_for(device).asarray(a)  # an error for any name but 'cuda' here


def to_numpy(a):
    return to_device(a, "cpu")


_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST = 1, 2, 3  # DLPack's DLDeviceType codes


def from_dlpack(x):
    """The NumPy (CPU) or CuPy (CUDA) array viewing the memory of any array that offers
    ``__dlpack__`` (a PyTorch tensor, a JAX or CuPy array), without a copy."""
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"from_dlpack needs an array offering __dlpack__ (PyTorch, JAX, CuPy, "
                        f"NumPy), got {type(x).__name__}")
    kind = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else _DLPACK_CPU
    if kind not in (_DLPACK_CPU, _DLPACK_CUDA, _DLPACK_CUDA_HOST):
        raise ValueError(f"from_dlpack takes arrays in CPU or CUDA memory, got a "
                         f"{type(x).__name__} on DLPack device type {int(kind)}")
    xp = xp_for("cuda") if kind == _DLPACK_CUDA else numpy
    try:
        return xp.from_dlpack(x)
    except (RuntimeError, BufferError, TypeError) as e:
        # e.g. a PyTorch tensor that requires grad, or a dtype NumPy lacks (bfloat16)
        raise TypeError(f"cannot take a {type(x).__name__} of dtype "
                        f"{getattr(x, 'dtype', '?')} through DLPack: {e}") from None


def as_array(x):
    """x as a NumPy or CuPy array: those as they are; an array offering __dlpack__
    through from_dlpack (no copy); one offering __array__ through numpy.asarray;
    anything else unchanged, for the caller's own checks to name."""
    if isinstance(x, numpy.ndarray) or is_cupy_array(x):
        return x
    if hasattr(x, "__dlpack__"):
        return from_dlpack(x)
    if hasattr(x, "__array__"):
        return numpy.asarray(x)
    return x
