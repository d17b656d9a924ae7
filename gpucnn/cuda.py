"""The GPU kernels: the .cu sources in kernels/, their loader and their launchers.

One RawModule per .cu file, compiled once per device with every template
instantiation named up front (name_expressions), as in CuPy's examples/gemm.
``Kernels`` holds the launch code (shapes, grids, typed scalars). It takes the
array module and the module loader as arguments so that the tests can run the
very same launchers on the CPU, through an emulator that compiles the same
unedited .cu files with g++ (tests/emulator).
"""
import collections
import importlib.resources
import pathlib

import numpy

TYPES = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float64): "double"}
KERNELS = {
    "conv2d_backward.cu": ("conv2d_backward_data", "conv2d_backward_filter",
                           "conv2d_backward_filter_reduce", "conv2d_backward_bias"),
    "max_pool2d.cu": ("max_pool2d_forward", "max_pool2d_backward"),
    "avg_pool2d.cu": ("avg_pool2d_forward", "avg_pool2d_backward"),
}
NVRTC_OPTIONS = ("--std=c++14",)
THREADS = 256       # a power of two: the block reductions need one
MAX_BLOCKS = 65536  # grid-stride loops cover the rest
FILTER_TILE, FILTER_STEP = 64, 16  # as in conv2d_backward.cu
FILTER_BLOCKS = 2048  # enough blocks to fill a large GPU; the i range is split to get them


# Dynamic shared memory per launch, from the element size.
SHARED_BYTES = {
    "conv2d_backward_filter": lambda itemsize: 2 * FILTER_STEP * FILTER_TILE * itemsize,
    "conv2d_backward_bias": lambda itemsize: THREADS * itemsize,
}


def name_expressions(filename):
    """Every template instantiation of a file, e.g. 'conv2d_backward_data<float>'."""
    return [f"{k}<{t}>" for k in KERNELS[filename] for t in TYPES.values()]


CompileUnit = collections.namedtuple(
    "CompileUnit", "filename config options name_expressions threads dynamic_shared",
    defaults=({},))
CompileUnit.__doc__ = """One NVRTC compilation the loader performs: kernels/<filename> with
the NVRTC options of one configuration (config: a short label), its name
expressions, and, per kernel base name, the threads per block its launcher uses
(threads) and, per name expression, the dynamic shared memory in bytes it
launches with where it uses some (dynamic_shared, optional)."""


def compile_units():
    """Every compilation of every kernel file and configuration, for the static
    report (gpucnn info --kernels) and the compile tests."""
    units = []
    for filename, kernels in KERNELS.items():
        dynamic = {f"{k}<{ctype}>": bytes_for(t.itemsize) for k, bytes_for in SHARED_BYTES.items()
                   for t, ctype in TYPES.items()}
        units.append(CompileUnit(filename, "default", NVRTC_OPTIONS, name_expressions(filename),
                                 {k: THREADS for k in kernels},
                                 {n: b for n, b in dynamic.items() if n.split("<")[0] in kernels}))
    return units


def source(filename):
    """The text of kernels/<filename>, from the installed package or the source tree."""
    try:
        path = importlib.resources.files("gpucnn.kernels").joinpath(filename)
        if path.is_file():
            return path.read_text()
    except ModuleNotFoundError:
        pass
    path = pathlib.Path(__file__).resolve().parent.parent / "kernels" / filename
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {filename} is missing: looked in the gpucnn.kernels "
                                f"package data and in {path.parent}")
    return path.read_text()


def _blocks(total):
    return max(1, min(MAX_BLOCKS, -(-total // THREADS)))


def _i32(*values):
    return [numpy.int32(v) for v in values]


class Kernels:
    """Launchers for the kernels, for one device.

    xp: the array module the arrays live in (cupy, or numpy under the emulator).
    load_module(code, name_expressions): returns an object with get_function(name).
    """

    def __init__(self, xp, load_module):
        self.xp = xp
        self._load_module = load_module
        self._modules = {}

    def _function(self, filename, kernel, dtype):
        name = f"{kernel}<{TYPES[numpy.dtype(dtype)]}>"
        try:
            if filename not in self._modules:
                self._modules[filename] = self._load_module(source(filename),
                                                            name_expressions(filename))
            return self._modules[filename].get_function(name)
        except Exception as e:  # CuPy's CompileException holds the NVRTC log
            raise RuntimeError(f"CUDA kernel {name} from kernels/{filename} failed to compile "
                               f"or load:\n{e}") from e

    def load_all(self):
        """Compile and load every kernel for float and double now; returns their names."""
        names = []
        for filename, kernels in KERNELS.items():
            for kernel in kernels:
                for dtype in TYPES:
                    self._function(filename, kernel, dtype)
                    names.append(f"{kernel}<{TYPES[dtype]}>")
        return names

    def _c(self, a):
        return self.xp.ascontiguousarray(a)

    def conv2d_backward_data(self, dy, weight, g):
        dy, weight = self._c(dy), self._c(weight)
        dx = self.xp.empty((g.N, g.C, g.H, g.W), dtype=dy.dtype)
        f = self._function("conv2d_backward.cu", "conv2d_backward_data", dy.dtype)
        f((_blocks(dx.size),), (THREADS,),
          (dy, weight, dx, *_i32(g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q, g.sh, g.sw,
                                 g.pt, g.pl, g.dh, g.dw, g.groups)))
        return dx

    def conv2d_backward_filter(self, dy, x, g):
        dy, x = self._c(dy), self._c(x)
        J, Kg, NPQ = g.C // g.groups * g.R * g.S, g.K // g.groups, g.N * g.P * g.Q
        grid_xy = (-(-J // FILTER_TILE), g.groups * -(-Kg // FILTER_TILE))
        # Split the N*P*Q reduction into slices (a function of the shape alone, so
        # the summation order, and the result, never change between runs).
        slices = max(1, min(-(-FILTER_BLOCKS // (grid_xy[0] * grid_xy[1])),
                            -(-NPQ // (4 * FILTER_STEP))))
        slice_len = -(-NPQ // slices)
        slice_len = -(-slice_len // FILTER_STEP) * FILTER_STEP
        slices = -(-NPQ // slice_len)
        partial = self.xp.empty((slices, g.K, J), dtype=dy.dtype)
        f = self._function("conv2d_backward.cu", "conv2d_backward_filter", dy.dtype)
        f((*grid_xy, slices), (THREADS,),
          (dy, x, partial, *_i32(g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q, g.sh, g.sw,
                                 g.pt, g.pl, g.dh, g.dw, g.groups), numpy.int64(slice_len)),
          shared_mem=SHARED_BYTES["conv2d_backward_filter"](dy.itemsize))
        shape = (g.K, g.C // g.groups, g.R, g.S)
        if slices == 1:
            return partial.reshape(shape)
        dweight = self.xp.empty(shape, dtype=dy.dtype)
        f = self._function("conv2d_backward.cu", "conv2d_backward_filter_reduce", dy.dtype)
        f((_blocks(dweight.size),), (THREADS,),
          (partial, dweight, numpy.int64(dweight.size), numpy.int32(slices)))
        return dweight

    def conv2d_backward_bias(self, dy):
        dy = self._c(dy)
        N, K, P, Q = dy.shape
        dbias = self.xp.empty((K,), dtype=dy.dtype)
        f = self._function("conv2d_backward.cu", "conv2d_backward_bias", dy.dtype)
        f((min(MAX_BLOCKS, K),), (THREADS,), (dy, dbias, *_i32(N, K, P * Q)),
          shared_mem=SHARED_BYTES["conv2d_backward_bias"](dy.itemsize))
        return dbias

    def max_pool2d_forward(self, x, g):
        """(y, indices) (N, C, P, Q): one thread per output scans its window."""
        x = self._c(x)
        y = self.xp.empty((g.N, g.C, g.P, g.Q), dtype=x.dtype)
        indices = self.xp.empty((g.N, g.C, g.P, g.Q), dtype=self.xp.int64)
        if y.size == 0:
            return y, indices
        f = self._function("max_pool2d.cu", "max_pool2d_forward", x.dtype)
        f((_blocks(y.size),), (THREADS,),
          (x, y, indices, *_i32(g.N, g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.sh, g.sw, g.ph, g.pw,
                                g.dh, g.dw)))
        return y, indices

    def max_pool2d_backward(self, dy, indices, g):
        """dx (N, C, H, W): one thread per input pixel gathers from the windows covering it."""
        dy, indices = self._c(dy), self._c(indices.astype(self.xp.int64, copy=False))
        dx = self.xp.empty((g.N, g.C, g.H, g.W), dtype=dy.dtype)
        if dx.size == 0:
            return dx
        f = self._function("max_pool2d.cu", "max_pool2d_backward", dy.dtype)
        f((_blocks(dx.size),), (THREADS,),
          (dy, indices, dx, *_i32(g.N, g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.sh, g.sw, g.ph, g.pw,
                                  g.dh, g.dw)))
        return dx

    def _avg_args(self, g):
        return _i32(g.N, g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.sh, g.sw, g.ph, g.pw,
                    g.count_include_pad, g.divisor_override or 0)

    def avg_pool2d_forward(self, x, g):
        """y (N, C, P, Q): one thread per output sums its window."""
        x = self._c(x)
        y = self.xp.empty((g.N, g.C, g.P, g.Q), dtype=x.dtype)
        if y.size == 0:
            return y
        f = self._function("avg_pool2d.cu", "avg_pool2d_forward", x.dtype)
        f((_blocks(y.size),), (THREADS,), (x, y, *self._avg_args(g)))
        return y

    def avg_pool2d_backward(self, dy, g):
        """dx (N, C, H, W): one thread per input pixel gathers the windows' shares."""
        dy = self._c(dy)
        dx = self.xp.empty((g.N, g.C, g.H, g.W), dtype=dy.dtype)
        if dx.size == 0:
            return dx
        f = self._function("avg_pool2d.cu", "avg_pool2d_backward", dy.dtype)
        f((_blocks(dx.size),), (THREADS,), (dy, dx, *self._avg_args(g)))
        return dx


_per_device = {}


def kernels_for(xp):
    """The Kernels serving arrays of the array module xp on its current device, or
    None where xp is NumPy (the CPU path). The one way an op asks for the kernels.

    Any CuPy-like module serves: the kernels are loaded through xp.RawModule
    (CuPy's, or a stand-in's), compiled on first use and cached per device.
    """
    if xp is numpy:
        return None
    key = (xp, xp.cuda.runtime.getDevice())
    if key not in _per_device:
        _per_device[key] = Kernels(xp, lambda code, names: xp.RawModule(
            code=code, options=NVRTC_OPTIONS, name_expressions=names))
    return _per_device[key]
