"""The GPU kernels of kernels/*.cu, assembled: every file's record (conv.py, pool.py),
and Kernels, their launchers for one device (loader.py loads them).

``kernels_for(xp)`` is the one way to get the Kernels of an array module's
current device; any CuPy-like module serves (CuPy's, or a stand-in's RawModule).
"""
import numpy

from . import conv, loader, pool
from .loader import NVRTC_OPTIONS, TYPES, CompileUnit, source

__all__ = ["Kernels", "kernels_for", "FILES", "KERNELS", "NVRTC_OPTIONS", "TYPES", "CompileUnit",
           "compile_units", "name_expressions", "source"]

FILES = conv.FILES + pool.FILES
KERNELS = {f.filename: f.kernels for f in FILES}  # filename -> its kernels' base names
_BY_NAME = {f.filename: f for f in FILES}


def compile_units():
    """Every (file, configuration) the loader can compile, with its full NVRTC options,
    its template instantiations, the threads per block each kernel is launched with
    and the dynamic shared memory of each instantiation (for gpucnn info --kernels
    and the compile tests)."""
    return loader.compile_units(FILES)


def name_expressions(filename):
    """Every template instantiation of a file, e.g. 'conv2d_forward<float>'."""
    return loader.instantiations(_BY_NAME[filename])


class Kernels(conv.ConvLaunchers, pool.PoolLaunchers, loader.Loader):
    """Launchers for the kernels, for one device.

    xp: the array module the arrays live in (cupy, or numpy under the emulator).
    load_module(code, name_expressions, options): returns an object with get_function(name).
    device_name: the GPU's name, the key of its tuned configurations (gpucnn tune);
    None uses the heuristic alone.
    """

    FILES = FILES


_per_device = {}


def _device_facts(xp, device):
    """(name, has TF32 tensor cores) of a device; (None, True) for a stand-in without
    device properties (no tuned choices; the emulator executes the MMAs)."""
    try:
        props = xp.cuda.runtime.getDeviceProperties(device)
    except Exception:
        return None, True
    name = props["name"]
    return (name.decode() if isinstance(name, bytes) else str(name)), props["major"] >= 8


def kernels_for(xp):
    """The Kernels serving arrays of the array module xp (CuPy or a module playing
    it) on its current device: compiled on first use, through xp.RawModule, and
    cached per device. None where xp is NumPy (the CPU has no kernels)."""
    if xp is numpy:
        return None
    device = xp.cuda.runtime.getDevice()
    key = (xp, device)
    if key not in _per_device:
        name, tensor_cores = _device_facts(xp, device)
        _per_device[key] = Kernels(xp, lambda code, names, options: xp.RawModule(
            code=code, options=options, name_expressions=names), name,
            tensor_cores=tensor_cores)
    return _per_device[key]
