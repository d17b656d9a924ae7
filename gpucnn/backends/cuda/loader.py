"""Compiling and loading the kernels of kernels/*.cu, driven by one record per file.

A KernelFile names a .cu file, its kernels (each instantiated for float and
double) and its builds: the ways the loader compiles it, each with its -D options
(a tile configuration), the threads per block each kernel is launched with and
the dynamic shared memory each launches with. The launchers declare their files'
records next to them (conv.py, pool.py); kernels.py collects them. One RawModule
per file and build is compiled once per device, every template instantiation
named up front (name_expressions), as in CuPy's examples/gemm; a .cu file with
options has no defaults of its own (it stops with an #error without them), so
every constant of a configuration is written here once.

The Loader takes the array module and the module loader as arguments, so that
the tests can run the very same launchers on the CPU, through an emulator that
compiles the same unedited .cu files with g++ (tests/emulator).
"""
import importlib.resources
import pathlib
import re
from collections import namedtuple

import numpy

TYPES = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float64): "double"}
# CuPy appends -ftz=true to every RawModule's options (cupy/cuda/compiler.py,
# _compile_with_cache_cuda) and NVRTC takes the last -ftz, so the kernels always
# run with float32 denormals flushed to zero; stating it here makes the NVRTC
# compile tests and the static report (gpucnn info --kernels) compile that code.
NVRTC_OPTIONS = ("--std=c++14", "-ftz=true")
THREADS = 256       # a power of two: the block reductions need one
MAX_BLOCKS = 65536  # grid-stride loops cover the rest
MAX_GRID_YZ = 65535  # the driver's limit on gridDim.y and gridDim.z
DEFAULT = "default"  # the label of a file's one build where it has one

Build = namedtuple("Build", "options threads shared types", defaults=({}, tuple(TYPES.values())))
Build.__doc__ = """One way a kernel file is compiled and launched: its -D options, the
threads per block each kernel is launched with ({kernel: threads}), the dynamic
shared memory each kernel launches with, in bytes, from the element size
({kernel: fn(itemsize)}; a kernel without any is absent), and the C types its
kernels are instantiated for (all of TYPES unless the build is, say, float-only)."""

KernelFile = namedtuple("KernelFile", "filename kernels builds")
KernelFile.__doc__ = """kernels/<filename>: its kernels (base names, each instantiated for
every type of TYPES) and its builds ({label: Build}), in the order they are listed."""

CompileUnit = namedtuple("CompileUnit",
                         "filename config options name_expressions threads dynamic_shared",
                         defaults=({},))
CompileUnit.__doc__ = """One NVRTC compilation the loader performs: kernels/<filename> with
the NVRTC options of one configuration (config: a short label), its name
expressions, and, per kernel base name, the threads per block its launcher uses
(threads) and, per name expression, the dynamic shared memory in bytes it
launches with where it uses some (dynamic_shared, optional)."""


def instantiations(file, label=None):
    """Every template instantiation of a KernelFile (of its build `label`; of every
    type where None), e.g. 'conv2d_forward<float>'."""
    types = TYPES.values() if label is None else file.builds[label].types
    return [f"{k}<{t}>" for k in file.kernels for t in types]


def _dynamic_shared(build):
    return {f"{k}<{ctype}>": shared(dtype.itemsize)
            for dtype, ctype in TYPES.items() if ctype in build.types
            for k, shared in build.shared.items()}


def compile_units(files):
    """The CompileUnit of every build of every KernelFile, in order."""
    return [CompileUnit(f.filename, label, NVRTC_OPTIONS + build.options,
                        instantiations(f, label), dict(build.threads), _dynamic_shared(build))
            for f in files for label, build in f.builds.items()]


def _read(filename):
    try:
        path = importlib.resources.files("gpucnn.kernels").joinpath(filename)
        if path.is_file():
            return path.read_text()
    except ModuleNotFoundError:
        pass
    path = pathlib.Path(__file__).resolve().parents[3] / "kernels" / filename
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {filename} is missing: looked in the gpucnn.kernels "
                                f"package data and in {path.parent}")
    return path.read_text()


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([\w.]+)"[ \t]*$', re.M)


def source(filename):
    """The text of kernels/<filename>, from the installed package or the source tree,
    with each `#include "x.cuh"` of another file of kernels/ pasted in its place
    (one level, between #line markers): one self-contained text for NVRTC, whose
    compile cache (CuPy's) keys on the text alone, and for the emulator."""
    text = _read(filename)

    def paste(m):
        line = text.count("\n", 0, m.start()) + 2
        return f'#line 1 "{m[1]}"\n{_read(m[1])}\n#line {line} "{filename}"'
    return _INCLUDE.sub(paste, text)


def blocks(total):
    """The blocks of THREADS threads a grid-stride launch over total items uses."""
    return max(1, min(MAX_BLOCKS, -(-total // THREADS)))


def i32(*values):
    """Values as the kernels' int parameters."""
    return [numpy.int32(v) for v in values]


def cdiv(a, b):
    return -(-a // b)


class Loader:
    """Loads the kernels of FILES for one device, each file and build once.

    xp: the array module the arrays live in (cupy, or numpy under the emulator).
    load_module(code, name_expressions, options): returns an object with get_function(name).
    device_name: the GPU's name (the key of its tuned choices), or None.
    """

    FILES = ()  # the KernelFile records served (the class that launches them sets it)

    def __init__(self, xp, load_module, device_name=None):
        self.xp = xp
        self.device_name = device_name
        self._load_module = load_module
        self._files = {f.filename: f for f in self.FILES}
        self._modules = {}
        self._functions = {}

    def _function(self, filename, kernel, dtype, config=DEFAULT):
        name = f"{kernel}<{TYPES[numpy.dtype(dtype)]}>"
        key = (filename, config, name)
        f = self._functions.get(key)
        if f is not None:
            return f
        try:
            if (filename, config) not in self._modules:
                file = self._files[filename]
                options = NVRTC_OPTIONS + file.builds[config].options
                self._modules[filename, config] = self._load_module(
                    source(filename), instantiations(file, config), options)
            f = self._functions[key] = self._modules[filename, config].get_function(name)
            return f
        except Exception as e:  # CuPy's CompileException holds the NVRTC log
            raise RuntimeError(f"CUDA kernel {name} from kernels/{filename} ({config}) failed to "
                               f"compile or load:\n{e}") from e

    def _launch(self, file, kernel, dtype, grid, block, args, config=DEFAULT):
        """Launch a kernel of a KernelFile with its build's dynamic shared memory."""
        shared = file.builds[config].shared.get(kernel)
        f = self._function(file.filename, kernel, dtype, config)
        f(grid, block, args, shared_mem=shared(numpy.dtype(dtype).itemsize) if shared else 0)

    def load_all(self):
        """Compile and load every kernel of every build for float and double now;
        returns their names."""
        names = []
        for unit in compile_units(self.FILES):
            for kernel in self._files[unit.filename].kernels:
                for dtype, ctype in TYPES.items():
                    if f"{kernel}<{ctype}>" in unit.name_expressions:
                        self._function(unit.filename, kernel, dtype, unit.config)
                        names.append(f"{kernel}<{ctype}> ({unit.config})")
        return names

    def _c(self, a):
        return self.xp.ascontiguousarray(a)
