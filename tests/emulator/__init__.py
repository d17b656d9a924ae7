"""Run kernels/*.cu on the CPU: g++ compiles the unedited source against
cuda_emu.h, and EmulatedModule answers like cupy.RawModule.

    module = EmulatedModule(code, name_expressions, options)
    module.get_function("conv2d_backward_data<float>")(grid, block, args, shared_mem=0)

args are NumPy arrays (passed as device pointers) and NumPy scalars (typed
like the kernel's parameters, as CuPy needs too). Set GPUCNN_EMU_ASAN=1 to
build with AddressSanitizer (python must then run with libasan preloaded).
"""
import ctypes
import hashlib
import os
import pathlib
import subprocess
import tempfile

import numpy

HERE = pathlib.Path(__file__).resolve().parent
CACHE = pathlib.Path(os.environ.get("GPUCNN_EMU_CACHE", tempfile.gettempdir())) / "gpucnn-emu"
_SCALARS = {numpy.dtype(numpy.bool_): ctypes.c_bool, numpy.dtype(numpy.int32): ctypes.c_int32,
            numpy.dtype(numpy.int64): ctypes.c_int64,
            numpy.dtype(numpy.float32): ctypes.c_float, numpy.dtype(numpy.float64): ctypes.c_double}


def asan_enabled():
    return os.environ.get("GPUCNN_EMU_ASAN") == "1"


def _flags():
    flags = ["-std=c++17", "-O1", "-g", "-shared", "-fPIC", "-Wall", "-Wno-unused-function",
             "-Wno-unknown-pragmas", "-Werror=return-type", f"-I{HERE}"]
    if asan_enabled():
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    return flags


def _build(code, name_expressions, options=()):
    """Compile code + one launcher per name expression into a shared library; the -D
    options among the NVRTC options (a tile configuration) go to g++ as well."""
    launchers = "\n".join(
        f'extern "C" void emu_launch_{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
        f'unsigned by, unsigned bz, size_t shared, void** args) {{\n'
        f'    emu_async::reset();  // cp.async copies never outlive a launch\n'
        f'    emu::launch(&{name}, dim3(gx, gy, gz), dim3(bx, by, bz), shared, args);\n}}'
        for i, name in enumerate(name_expressions))
    flags = _flags() + [o for o in options if o.startswith("-D")]
    header = (HERE / "cuda_emu.h").read_text()
    key = hashlib.sha256("\0".join([code, launchers, header, *flags]).encode()).hexdigest()[:20]
    CACHE.mkdir(parents=True, exist_ok=True)
    lib = CACHE / f"{key}.so"
    if not lib.exists():
        src = CACHE / f"{key}.cu.cpp"
        src.write_text(f'#include "cuda_emu.h"\n#line 1 "kernel.cu"\n{code}\n'
                       f'#line 1 "launchers"\n{launchers}\n')
        tmp = CACHE / f"{key}.{os.getpid()}.so"
        done = subprocess.run(["g++", *flags, "-o", str(tmp), str(src)], capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"g++ could not compile the kernels for emulation:\n{done.stderr}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


class EmulatedFunction:
    def __init__(self, name, entry):
        self.name = name
        self._entry = entry
        entry.restype = None
        entry.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t, ctypes.c_void_p]

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        values = []
        for i, a in enumerate(args):
            if isinstance(a, numpy.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: argument {i} is not C-contiguous")
                values.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, numpy.generic) and a.dtype in _SCALARS:
                values.append(_SCALARS[a.dtype](a.item()))
            else:
                raise TypeError(f"{self.name}: argument {i} must be a NumPy array or a typed NumPy "
                                f"scalar, got {type(a).__name__}")
        argv = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        self._entry(*grid, *block, shared_mem, argv)


class EmulatedModule:
    """The cupy.RawModule(code=..., name_expressions=..., options=...) interface, on the CPU."""

    def __init__(self, code, name_expressions, options=()):
        self._names = list(name_expressions)
        self._lib = _build(code, self._names, tuple(options))

    def get_function(self, name):
        if name not in self._names:
            raise KeyError(f"{name} was not among the name_expressions {self._names}")
        return EmulatedFunction(name, getattr(self._lib, f"emu_launch_{self._names.index(name)}"))
