"""Devices and the array module: NumPy on the CPU, CuPy on an NVIDIA GPU.

Every layer is written once against ``xp = get_array_module(...)``. CuPy is
imported lazily, so the package imports and runs where CuPy or a GPU is
missing; asking for ``cuda`` there is an error that says which of the two.
"""
import os

import numpy

from .errors import ConfigError, DeviceError

DEVICES = ("cpu", "cuda", "auto")
_cupy = None
_cupy_error = None
_cupy_short = None  # the same in a few words, for the one-line device report


def _import_cupy():
    """Return the cupy module, or None; remember why it is unusable."""
    global _cupy, _cupy_error, _cupy_short
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    try:
        import cupy
    except ImportError as e:  # not installed
        _cupy_error = (
            f"CuPy is not installed ({e}); install gpucnn with the 'cuda12' or "
            "'cuda13' extra, e.g. pip install 'gpucnn[cuda12]'")
        _cupy_short = "CuPy not installed"
        return None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device, broken install
        _cupy_error = f"CuPy is installed but no CUDA device is usable: {e}"
        _cupy_short = "no usable CUDA device"
        return None
    if count < 1:
        _cupy_error = "CuPy is installed but reports no CUDA device"
        _cupy_short = "no CUDA device"
        return None
    _cupy = cupy
    return cupy


def cuda_available():
    """True where CuPy imports and sees at least one CUDA device."""
    return _import_cupy() is not None


def cuda_unavailable_reason():
    """Why ``cuda`` cannot be used here, or None where it can."""
    _import_cupy()
    return _cupy_error


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
    _import_cupy()
    return "cpu", _cupy_short  # e.g. "CuPy not installed"; the details: cuda_unavailable_reason()


def is_cupy_array(a):
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def device_of(a):
    """'cuda' for a CuPy array, 'cpu' for anything else."""
    return "cuda" if is_cupy_array(a) else "cpu"


def get_array_module(*arrays):
    """numpy or cupy, whichever holds the arrays; arrays on both is an error."""
    devices = {device_of(a) for a in arrays if a is not None}
    if len(devices) > 1:
        raise ValueError("arrays are on different devices (cpu and cuda); move them "
                         "to one device first (gpucnn.backend.to_device)")
    return _cupy if devices == {"cuda"} else numpy


def xp_for(device):
    """The array module of a resolved device name."""
    if device == "cuda":
        if not cuda_available():
            raise RuntimeError(f"device 'cuda' is not usable: {cuda_unavailable_reason()}")
        return _cupy
    if device == "cpu":
        return numpy
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def to_device(a, device):
    """Copy (only when needed) an array to 'cpu' or 'cuda'."""
    if a is None:
        return None
    if device == "cpu":
        return a.get() if is_cupy_array(a) else numpy.asarray(a)
    return xp_for("cuda").asarray(a)


def to_numpy(a):
    return to_device(a, "cpu")
