"""Run kernels/*.cu on the CPU: g++ compiles the unedited source against
cuda_emu.h, and EmulatedModule answers like cupy.RawModule.

    module = EmulatedModule(code, name_expressions, options=(), order=0)
    module.get_function("conv2d_backward_data<float>")(grid, block, args, shared_mem=0)

args are NumPy arrays (passed as device pointers) and NumPy scalars, checked
against the kernel's parameters (ArgumentError): CuPy hands the driver a
pointer to each scalar stored at its NumPy type's size, whatever the kernel
declares, and the driver copies the parameter's size from there, so an int64
for an `int` is cut to its low half, an int32 for a `long long` read past its
end, a float64 for a `float` garbled. Like CuPy, the module compiles with
-ftz=true after the caller's options, so float32 kernels flush denormals as on
the GPU (cuda_emu.h). `order` picks the order the
threads of a block (and the blocks) run in between barriers: 0 index order,
1 reverse, n >= 2 a seeded shuffle (cuda_emu.h); with compare_order every launch
runs under both orders and must give the same bits (else OrderError); ORDERS are
what the kernel tests run. The -D options among `options` (NVRTC's; a tile
configuration) are passed to g++ too. Launches the driver would refuse, and
barriers that not every thread of a block reaches (cuda_emu.h), raise
LaunchError. Set GPUCNN_EMU_ASAN=1 to build with AddressSanitizer (python must
then run with libasan preloaded).

kernels(order, compare_order) gives gpucnn's own launchers (cuda.Kernels) on the
emulator, with every output they allocate poisoned (poisoned.numpy), as the tests
use them. The loader rewrites each `__shared__` declaration in place (same lines)
for the emulator's shared memory; the rest of the source is compiled as it is.
"""
import ctypes
import functools
import hashlib
import os
import pathlib
import re
import subprocess
import tempfile

import numpy

from . import poisoned

HERE = pathlib.Path(__file__).resolve().parent
CACHE = pathlib.Path(os.environ.get("GPUCNN_EMU_CACHE", tempfile.gettempdir())) / "gpucnn-emu"
# The NumPy type of each C type cuda_emu.h names (LP64, as NVRTC on Linux has it).
C_TYPES = {"bool": numpy.bool_, "char": numpy.int8, "signed char": numpy.int8,
           "unsigned char": numpy.uint8, "short": numpy.int16, "unsigned short": numpy.uint16,
           "int": numpy.int32, "unsigned int": numpy.uint32, "long": numpy.int64,
           "unsigned long": numpy.uint64, "long long": numpy.int64,
           "unsigned long long": numpy.uint64, "float": numpy.float32, "double": numpy.float64}
C_TYPES = {k: numpy.dtype(v) for k, v in C_TYPES.items()}
# What CuPy's _compile_with_cache_cuda appends to every RawModule's options
# (cupy/cuda/compiler.py); NVRTC takes the last -ftz it is given.
CUPY_APPENDED_OPTIONS = ("-ftz=true",)


def asan_enabled():
    return os.environ.get("GPUCNN_EMU_ASAN") == "1"


def _flags():
    flags = ["-std=c++17", "-O1", "-g", "-shared", "-fPIC", "-Wall", "-Wno-unused-function",
             "-Wno-unknown-pragmas", "-Werror=return-type", f"-I{HERE}"]
    if asan_enabled():
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    return flags


# What the kernel tests run: index order alone, then a shuffle checked bitwise
# against reverse order, as (order, compare_order).
ORDERS = ((0, None), (2, 1))
DEFAULT_MAX_DYNAMIC_SHARED = 48 * 1024  # the driver's, until a launcher opts in
MAX_SHARED_SM90 = 227 * 1024


class LaunchError(RuntimeError):
    """A launch that cuLaunchKernel or cuFuncSetAttribute would refuse, or whose
    __syncthreads not every thread of a block reaches."""


class ArgumentError(TypeError):
    """A kernel argument whose type does not match the kernel's parameter."""


class OrderError(AssertionError):
    """A launch whose result changed with the order threads and blocks ran in."""


# `extern __shared__ T name[];` (dynamic) and `__shared__ T name[dims];` (static),
# one declaration per line, outside // comments.
_DYNAMIC = re.compile(r"\bextern\s+__shared__\s+([^;{}=\n]*?)\s*\b([A-Za-z_]\w*)\s*\[\s*\]\s*;")
_STATIC = re.compile(r"\b__shared__\s+([^;{}=\n]*?)\b([A-Za-z_]\w*)\s*((?:\[[^\];\n]*\]\s*)*);")
_ALIGN = re.compile(r"\b(__align__|alignas)\s*\(\s*\d+\s*\)|__attribute__\s*\(\(.*?\)\)")


def _shared_declarations(code):
    """Rewrite the kernels' __shared__ declarations for cuda_emu.h, line for line:
    the dynamic array becomes a pointer to the arena emu::dynamic_shared, and a
    static array a function-local static that its block's first thread fills
    with 0xFF (emu::shared_static)."""
    def dynamic(m):
        t = _ALIGN.sub("", m[1]).strip()
        return f"{t}* const {m[2]} = reinterpret_cast<{t}*>(emu::dynamic_shared);"

    def static(m):
        if "," in _ALIGN.sub("", m[1]):
            raise ValueError(f"the emulator takes one variable per __shared__ declaration: "
                             f"{m[0]!r}")
        return f"{m[0]} emu::shared_static(&{m[2]}, sizeof({m[2]}));"

    lines = []
    for line in code.split("\n"):
        text, comment = (line.split("//", 1) + [None])[:2]
        text = _STATIC.sub(static, _DYNAMIC.sub(dynamic, text))
        lines.append(text if comment is None else f"{text}//{comment}")
    return "\n".join(lines)


def flushes_denormals(options):
    """Whether NVRTC compiles float32 arithmetic with flush-to-zero under these
    options: the last -ftz (or --ftz) decides, --use_fast_math implies it, the
    default is false."""
    ftz = False
    for o in options:
        if o.lstrip("-") in ("use_fast_math", "use-fast-math"):
            ftz = True
        elif o.lstrip("-").startswith("ftz="):
            ftz = o.split("=", 1)[1] == "true"
    return ftz


def _split_top_level(text):
    """text split at the commas outside (), [], {} and template brackets (a < or >
    inside parentheses is taken for a comparison)."""
    parts, nest, angles, start = [], 0, 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            nest += 1
        elif ch in ")]}":
            nest -= 1
        elif ch in "<>" and nest == 0:
            angles += 1 if ch == "<" else -1
        elif ch == "," and nest == 0 and angles == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parameter_names(code, name):
    """The parameter names of the __global__ function `name` (a name expression such
    as 'k<float>') in code, or None where its definition is not found."""
    base = re.escape(name.split("<")[0].strip())
    code = re.sub(r"//[^\n]*|/\*.*?\*/", " ", code, flags=re.S)
    for m in re.finditer(rf"\b{base}\s*\(", code):
        head = code[max(code.rfind(";", 0, m.start()), code.rfind("}", 0, m.start())) + 1:
                    m.start()]
        if "__global__" not in head:
            continue
        depth, end = 1, m.end()
        while depth and end < len(code):
            depth += {"(": 1, ")": -1}.get(code[end], 0)
            end += 1
        names = []
        for param in _split_top_level(code[m.end():end - 1]):
            found = re.findall(r"[A-Za-z_]\w*", param.split("=")[0])
            names.append(found[-1] if found else "?")
        return names
    return None


def _build(code, name_expressions, options=()):
    """Compile code + one launcher per name expression into a shared library; the -D
    options among the NVRTC options (a tile configuration) go to g++ as well."""
    code = _shared_declarations(code)
    launchers = "\n".join(
        f'extern "C" const char* emu_launch_{i}(unsigned gx, unsigned gy, unsigned gz, '
        f'unsigned bx, unsigned by, unsigned bz, size_t shared, size_t max_dynamic, '
        f'unsigned order, unsigned ftz, void** args) {{\n'
        f'    emu_async::reset();  // cp.async copies never outlive a launch\n'
        f'    return emu::launch(&{name}, dim3(gx, gy, gz), dim3(bx, by, bz), shared, '
        f'max_dynamic, order, ftz != 0, args);\n}}\n'
        f'extern "C" const char* emu_signature_{i}() {{ return emu::signature(&{name}); }}'
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
    """cupy's Function: call it to launch; max_dynamic_shared_size_bytes is the
    kernel's attribute (shared by every Function of that name in the module, as
    the driver keeps it per kernel)."""

    def __init__(self, name, entry, module, parameters):
        self.name = name
        self._entry = entry
        self._module = module
        self.parameters = parameters  # [(C type, name)] as the kernel declares them
        entry.restype = ctypes.c_char_p
        entry.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t] * 2 + [ctypes.c_uint] * 2 + [
            ctypes.c_void_p]

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._module._max_dynamic.get(self.name, DEFAULT_MAX_DYNAMIC_SHARED)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        if not 0 <= int(value) <= MAX_SHARED_SM90:
            raise LaunchError(f"{self.name}: max_dynamic_shared_size_bytes must be "
                              f"0..{MAX_SHARED_SM90} (227 KiB on sm_90), got {value}")
        self._module._max_dynamic[self.name] = int(value)

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        for what, dims in (("grid", grid), ("block", block)):
            if len(dims) != 3 or not all(0 <= int(d) < 2 ** 32 for d in dims):
                raise LaunchError(f"{self.name}: {what} {dims} is not three 32-bit sizes")
        values = self._pack(args)
        argv = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        arrays = [a for a in args if isinstance(a, numpy.ndarray)]
        compare = self._module.compare_order
        if compare is not None:  # run under the other order first, from the same inputs
            before = [a.copy() for a in arrays]
            self._launch(grid, block, shared_mem, compare, argv)
            other = [a.copy() for a in arrays]
            for a, b in zip(arrays, before):
                a[...] = b
        self._launch(grid, block, shared_mem, self._module.order, argv)
        if compare is not None:
            for i, (a, b) in enumerate(zip(arrays, other)):
                differ = a.view(numpy.uint8).reshape(-1, a.itemsize) != \
                    b.view(numpy.uint8).reshape(-1, b.itemsize)
                if differ.any():
                    raise OrderError(
                        f"{self.name}: array argument {i} differs between thread orders "
                        f"{compare} and {self._module.order} in {differ.any(axis=1).sum()} of "
                        f"{a.size} elements: the result depends on how threads or blocks are "
                        f"scheduled (a race, or a summation order that follows the schedule)")

    def _pack(self, args):
        """The arguments as cuLaunchKernel's values, each checked against its parameter."""
        params = self.parameters
        if len(args) != len(params):
            raise ArgumentError(f"{self.name} takes {len(params)} arguments "
                                f"({', '.join(f'{t} {n}' for t, n in params)}), got {len(args)}")
        values = []
        for i, (a, (ctype, pname)) in enumerate(zip(args, params)):
            what = f"{self.name}: argument {i} ({ctype} {pname})"
            pointer = ctype.endswith("*")
            base = ctype.removeprefix("const ").removesuffix("*")
            if base not in C_TYPES and not (pointer and base == "void"):
                raise ArgumentError(f"{what}: the emulator cannot check a parameter of this type")
            if isinstance(a, numpy.ndarray):
                if not pointer:
                    raise ArgumentError(f"{what}: got an array of {a.dtype} for a scalar")
                if base != "void" and a.dtype != C_TYPES[base]:
                    raise ArgumentError(f"{what}: got an array of {a.dtype} where the kernel "
                                        f"reads {C_TYPES[base]}")
                if not a.flags.c_contiguous:
                    raise ValueError(f"{self.name}: argument {i} is not C-contiguous")
                values.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, numpy.generic):
                if pointer:
                    raise ArgumentError(f"{what}: got a scalar of {a.dtype} for a pointer")
                if a.dtype != C_TYPES[base]:
                    raise ArgumentError(f"{what}: got a scalar of {a.dtype} where the kernel reads "
                                        f"{C_TYPES[base]}; CuPy would pass its "
                                        f"{a.dtype.itemsize} bytes as they are, and the kernel "
                                        f"read {C_TYPES[base].itemsize}")
                values.append(ctypes.create_string_buffer(a.tobytes(), 8))
            else:
                raise TypeError(f"{what} must be a NumPy array or a typed NumPy scalar, got "
                                f"{type(a).__name__}")
        return values

    def _launch(self, grid, block, shared_mem, order, argv):
        error = self._entry(*grid, *block, shared_mem, self.max_dynamic_shared_size_bytes,
                            order, self._module.flush_denormals, argv)
        if error is not None:
            raise LaunchError(f"{self.name}: {error.decode()}")


class EmulatedModule:
    """The cupy.RawModule(code=..., name_expressions=..., options=...) interface, on the CPU.

    order: the thread and block order of its launches (see cuda_emu.h).
    compare_order: if given, every launch runs first under this order, then
    again from the same inputs under `order`, and any array argument whose bits
    differ between the two raises OrderError (costs a second run).
    """

    def __init__(self, code, name_expressions, options=(), *, order=0, compare_order=None):
        self._names = list(name_expressions)
        self._lib = _build(code, self._names, tuple(options))
        self._code = code
        self.flush_denormals = flushes_denormals(tuple(options) + CUPY_APPENDED_OPTIONS)
        self._max_dynamic = {}
        self.order = int(order)
        self.compare_order = None if compare_order is None else int(compare_order)

    def get_function(self, name):
        if name not in self._names:
            raise KeyError(f"{name} was not among the name_expressions {self._names}")
        i = self._names.index(name)
        signature = getattr(self._lib, f"emu_signature_{i}")
        signature.restype = ctypes.c_char_p
        types = signature().decode().split(";")[:-1]
        names = parameter_names(self._code, name)
        if names is None or len(names) != len(types):
            names = [f"#{j}" for j in range(len(types))]
        return EmulatedFunction(name, getattr(self._lib, f"emu_launch_{i}"), self,
                                list(zip(types, names)))


def kernels(order=0, compare_order=None, cls=None):
    """gpucnn's launchers (cuda.Kernels, or the subclass cls) running on the CPU
    through the emulator: threads in the given order (every launch checked
    bitwise against compare_order where given), outputs poisoned."""
    from gpucnn.backends.cuda import kernels as cuda
    return (cls or cuda.Kernels)(poisoned.numpy, functools.partial(
        EmulatedModule, order=order, compare_order=compare_order))
