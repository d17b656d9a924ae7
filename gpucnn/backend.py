"""The one seam between gpucnn's device-independent code and the devices.

The device module (gpucnn/backends/device.py) says which devices there are and
which array module holds an array; ``ops_for(xp)`` gives the implementation that
serves an array module: gpucnn.backends.cpu's for NumPy, gpucnn.backends.cuda's
for CuPy (or the module playing it, ``set_cupy_module``). Functional code calls
``ops_for(xp).conv2d_forward(...)`` and never branches on the device.
"""
import numpy

from .backends import cpu, cuda
from .backends.device import (  # noqa: F401  (the device functions, from here)
    DEVICES, as_array, cuda_available, cuda_unavailable_reason, device_of, from_dlpack,
    get_array_module, gpu_count, graph_capture_replays, is_cupy_array, resolve_device,
    set_cupy_module, to_device, to_numpy, use_gpu, xp_for)

__all__ = ["DEVICES", "as_array", "cuda_available", "cuda_unavailable_reason", "device_of",
           "from_dlpack", "get_array_module", "gpu_count", "graph_capture_replays",
           "is_cupy_array", "resolve_device", "set_cupy_module", "to_device", "to_numpy",
           "use_gpu", "xp_for", "ops_for"]


def ops_for(xp):
    """The ops serving arrays of the array module xp (CpuOps for NumPy, CudaOps for
    CuPy or the module playing it)."""
    return cpu.OPS if xp is numpy else cuda.ops_for(xp)
