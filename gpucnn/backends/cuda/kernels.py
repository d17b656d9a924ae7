"""The GPU kernels: the .cu sources in kernels/, their loader and their launchers.

One RawModule per .cu file and tile configuration, compiled once per device with
every template instantiation named up front (name_expressions) and the
configuration as -D options, as in CuPy's examples/gemm. The configurations are
defined here only (CONV_CONFIGS); each .cu compiles alone with #ifndef defaults.
A configuration is picked per pass and shape: the one `gpucnn tune` measured
fastest on this GPU (gpucnn/tune.py), else heuristic_config.
``Kernels`` holds the launch code (shapes, grids, typed scalars). It takes the
array module and the module loader as arguments so that the tests can run the
very same launchers on the CPU, through an emulator that compiles the same
unedited .cu files with g++ (tests/emulator).
"""
import importlib.resources
import math
import pathlib
from collections import namedtuple

import numpy

TYPES = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float64): "double"}
KERNELS = {
    "conv2d.cu": ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter"),
    "conv2d_reduce.cu": ("conv2d_sum_slices", "conv2d_backward_bias"),
    "max_pool2d.cu": ("max_pool2d_forward", "max_pool2d_backward"),
    "avg_pool2d.cu": ("avg_pool2d_forward", "avg_pool2d_backward"),
}
NVRTC_OPTIONS = ("--std=c++14",)
THREADS = 256       # a power of two: the block reductions need one
MAX_BLOCKS = 65536  # grid-stride loops cover the rest
MAX_GRID_YZ = 65535  # the driver's limit on gridDim.y and gridDim.z

# The implicit-GEMM tile configurations of kernels/conv2d.cu, the one place they
# are defined: rows x columns of a block tile (bm x bn), its reduction depth per
# stage (bk for float, bk_double for double, whose 8x8 accumulators take twice the
# registers), the outputs each thread holds (tm x tn) and the stages per main-loop iteration
# (unroll, even). They reach the kernel as -D options.
TileConfig = namedtuple("TileConfig", "bm bn bk bk_double tm tn unroll")
CONV_CONFIGS = {
    "128x128": TileConfig(128, 128, 16, 8, 8, 8, 2),  # big layers: 256 threads, 8x8 outputs each
    "64x64": TileConfig(64, 64, 8, 4, 8, 8, 4),       # mid-size: 4x the blocks, of 64 threads
    "128x32": TileConfig(128, 32, 8, 4, 8, 8, 4),     # few GEMM columns (C or K <= 32): 64 threads
    "32x128": TileConfig(32, 128, 8, 2, 8, 8, 4),     # few GEMM rows (K <= 32, backward-filter)
    "32x32": TileConfig(32, 32, 8, 4, 8, 4, 8),       # both small: one warp, 8x4 outputs each
}
SMEM_PAD = 4         # floats of padding per shared-memory row (-DCONV_PAD): rows are bm+4
                     # and bn+4 long, the 8 k-rows a warp stores at once on different banks
REDUCE_LANES = 8     # slice lanes per output in conv2d_sum_slices (blockDim.y)
TARGET_BLOCKS = 264  # ~2 blocks per SM of a 132-SM GPU: the split-K and bias grids aim here;
                     # a constant, so that a shape's summation order is the same on every GPU
MIN_SLICE = 256      # reduction values per split-K slice, at least (16 float stages)
PASSES = ("forward", "backward_data", "backward_filter")

CompileUnit = namedtuple("CompileUnit",
                         "filename config options name_expressions threads dynamic_shared",
                         defaults=({},))
CompileUnit.__doc__ = """One NVRTC compilation the loader performs: kernels/<filename> with
the NVRTC options of one configuration (config: a short label), its name
expressions, and, per kernel base name, the threads per block its launcher uses
(threads) and, per name expression, the dynamic shared memory in bytes it
launches with where it uses some (dynamic_shared, optional)."""
# Dynamic shared memory of the reduction kernels per launch, from the element size.
REDUCE_SHARED = {"conv2d_sum_slices": lambda itemsize: 32 * REDUCE_LANES * itemsize,
                 "conv2d_backward_bias": lambda itemsize: THREADS * itemsize}


def _config_threads(c):
    return (c.bm // c.tm) * (c.bn // c.tn)


def conv_options(config):
    """The -D options that compile kernels/conv2d.cu with a named configuration."""
    c = CONV_CONFIGS[config]
    return (f"-DCONV_BM={c.bm}", f"-DCONV_BN={c.bn}", f"-DCONV_BK={c.bk}",
            f"-DCONV_BK_DOUBLE={c.bk_double}",
            f"-DCONV_TM={c.tm}", f"-DCONV_TN={c.tn}", f"-DCONV_UNROLL={c.unroll}",
            f"-DCONV_PAD={SMEM_PAD}")


def _configs(filename):
    """(label, -D options) for every configuration a file is compiled with."""
    if filename == "conv2d.cu":
        return [(name, conv_options(name)) for name in CONV_CONFIGS]
    if filename == "conv2d_reduce.cu":
        return [("default", (f"-DREDUCE_LANES={REDUCE_LANES}",))]
    return [("default", ())]


def _threads(filename, config):
    if filename == "conv2d.cu":
        return dict.fromkeys(KERNELS[filename], _config_threads(CONV_CONFIGS[config]))
    if filename == "conv2d_reduce.cu":
        return {"conv2d_sum_slices": 32 * REDUCE_LANES, "conv2d_backward_bias": THREADS}
    return dict.fromkeys(KERNELS[filename], THREADS)


def _dynamic_shared(filename, config):
    out = {}
    for dtype, ctype in TYPES.items():
        if filename == "conv2d.cu":
            out.update({f"{k}<{ctype}>": _smem_bytes(config, dtype) for k in KERNELS[filename]})
        elif filename == "conv2d_reduce.cu":
            out.update({f"{k}<{ctype}>": b(dtype.itemsize) for k, b in REDUCE_SHARED.items()})
    return out


def compile_units():
    """Every (file, configuration) the loader can compile, with its full NVRTC options,
    its template instantiations, the threads per block each kernel is launched with
    and the dynamic shared memory of each instantiation (for gpucnn info --kernels
    and the compile tests)."""
    return [CompileUnit(filename, config, NVRTC_OPTIONS + options, name_expressions(filename),
                        _threads(filename, config), _dynamic_shared(filename, config))
            for filename in KERNELS for config, options in _configs(filename)]


def name_expressions(filename):
    """Every template instantiation of a file, e.g. 'conv2d_forward<float>'."""
    return [f"{k}<{t}>" for k in KERNELS[filename] for t in TYPES.values()]


def source(filename):
    """The text of kernels/<filename>, from the installed package or the source tree."""
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


def _blocks(total):
    return max(1, min(MAX_BLOCKS, -(-total // THREADS)))


def _i32(*values):
    return [numpy.int32(v) for v in values]


def _cdiv(a, b):
    return -(-a // b)


def gemm_shape(pass_, g):
    """(rows, columns, reduction length, independent GEMMs) of a convolution pass, as
    kernels/conv2d.cu sets it up; backward-data's GEMMs are one per group and stride
    phase, the largest phase's rows counted."""
    Cg, Kg = g.C // g.groups, g.K // g.groups
    if pass_ == "forward":
        return g.N * g.P * g.Q, Kg, Cg * g.R * g.S, g.groups
    if pass_ == "backward_data":
        rows = g.N * _cdiv(g.H, g.sh) * _cdiv(g.W, g.sw)
        return rows, Cg, Kg * _cdiv(g.R, g.sh) * _cdiv(g.S, g.sw), g.groups * g.sh * g.sw
    if pass_ == "backward_filter":
        return Kg, Cg * g.R * g.S, g.N * g.P * g.Q, g.groups
    raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")


def heuristic_config(pass_, g):
    """The tile configuration for a pass and shape when none was tuned: narrow tiles
    where a GEMM side is <= 32, else the big tile when its blocks fill a large GPU once
    (backward-filter always, its split-K fills the GPU) and 64x64 when they do not."""
    rows, cols, _, count = gemm_shape(pass_, g)
    if rows <= 32 and cols <= 32:
        return "32x32"
    if cols <= 32:
        return "128x32"
    if rows <= 32:
        return "32x128"
    if pass_ == "backward_filter":
        return "128x128" if rows >= 128 and cols >= 128 else "64x64"
    big = _cdiv(rows, 128) * _cdiv(cols, 128) * count
    return "128x128" if big >= TARGET_BLOCKS // 2 else "64x64"  # a full wave of big tiles


def filter_slices(g, config):
    """(slices, slice_len) of backward-filter's split of its N*P*Q reduction: enough
    slices that the grid reaches TARGET_BLOCKS, each at least MIN_SLICE long; a
    function of the shape and configuration alone, so the summation order is fixed."""
    c = CONV_CONFIGS[config]
    rows, cols, length, count = gemm_shape("backward_filter", g)
    tiles = _cdiv(rows, c.bm) * _cdiv(cols, c.bn) * count
    slices = max(1, min(_cdiv(TARGET_BLOCKS, tiles), _cdiv(length, MIN_SLICE),
                        MAX_GRID_YZ // g.groups))
    slice_len = _cdiv(_cdiv(length, slices), 16) * 16  # whole stages
    return _cdiv(length, slice_len), slice_len


def dgrad_phases(g):
    """Backward-data's stride phases, one row of 14 ints per phase (ph, pw) in
    row-major order: h1st w1st Hph Wph r0 s0 rstep sstep nr ns offh offw dph dpw.

    Phase (ph, pw) holds the input pixels with (h + pt) % sh == ph, (w + pl) % sw == pw:
    h = h1st + ih*sh for ih < Hph. Its taps are r = r0 + i*rstep for i < nr (the r
    with r*dh % sh == ph), and tap i reads dy row p = ih + offh - i*dph; likewise
    along the width. A phase no tap reaches has nr or ns 0 (its pixels get zeros).
    """
    def axis(size, stride, pad, taps, dil, phase):
        first = (phase - pad) % stride
        count = max(0, _cdiv(size - first, stride))
        r0 = next((r for r in range(taps) if r * dil % stride == phase), taps)
        step = stride // math.gcd(stride, dil)
        n = len(range(r0, taps, step))
        off = (first + pad - r0 * dil) // stride if n else 0
        return first, count, r0, step, n, off, step * dil // stride

    rows = []
    for ph in range(g.sh):
        for pw in range(g.sw):
            h1, hc, r0, rs, nr, oh, dph = axis(g.H, g.sh, g.pt, g.R, g.dh, ph)
            w1, wc, s0, ss, ns, ow, dpw = axis(g.W, g.sw, g.pl, g.S, g.dw, pw)
            rows.append((h1, w1, hc, wc, r0, s0, rs, ss, nr, ns, oh, ow, dph, dpw))
    return numpy.array(rows, dtype=numpy.int32)


def _smem_bytes(config, dtype):
    c, itemsize = CONV_CONFIGS[config], numpy.dtype(dtype).itemsize
    bk = c.bk if itemsize == 4 else c.bk_double
    return 2 * bk * (c.bm + SMEM_PAD + c.bn + SMEM_PAD) * itemsize


def _check_grid(name, grid, g):
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"{name}: the launch grid {grid} exceeds the limit of {MAX_GRID_YZ} "
                         f"blocks in y or z for {g}")
    if max(g.N * g.C * g.H * g.W, g.N * g.K * g.P * g.Q, g.K * g.C * g.R * g.S) >= 2 ** 31:
        raise ValueError(f"{name}: a tensor of {g} has 2**31 elements or more, past the "
                         "32-bit indices of the convolution kernels")


class Kernels:
    """Launchers for the kernels, for one device.

    xp: the array module the arrays live in (cupy, or numpy under the emulator).
    load_module(code, name_expressions, options): returns an object with get_function(name).
    device_name: the GPU's name, the key of its tuned configurations (gpucnn tune);
    None uses the heuristic alone.
    """

    def __init__(self, xp, load_module, device_name=None):
        self.xp = xp
        self.device_name = device_name
        self._load_module = load_module
        self._modules = {}
        self._functions = {}
        self._choices = {}  # (pass, shape, dtype) -> configuration: fixed once chosen
        self._phases = {}   # geometry -> its dgrad_phases table on the device
        self._tuned = None

    def _function(self, filename, kernel, dtype, config="default"):
        name = f"{kernel}<{TYPES[numpy.dtype(dtype)]}>"
        key = (filename, config, name)
        f = self._functions.get(key)
        if f is not None:
            return f
        try:
            if (filename, config) not in self._modules:
                options = NVRTC_OPTIONS + dict(_configs(filename))[config]
                self._modules[filename, config] = self._load_module(
                    source(filename), name_expressions(filename), options)
            f = self._functions[key] = self._modules[filename, config].get_function(name)
            return f
        except Exception as e:  # CuPy's CompileException holds the NVRTC log
            raise RuntimeError(f"CUDA kernel {name} from kernels/{filename} ({config}) failed to "
                               f"compile or load:\n{e}") from e

    def load_all(self):
        """Compile and load every kernel of every configuration for float and double now;
        returns their names."""
        names = []
        for unit in compile_units():
            for kernel in KERNELS[unit.filename]:
                for dtype in TYPES:
                    self._function(unit.filename, kernel, dtype, unit.config)
                    names.append(f"{kernel}<{TYPES[dtype]}> ({unit.config})")
        return names

    def config_for(self, pass_, g, dtype):
        """The configuration a pass runs with for this shape and dtype: the tuned one for
        this GPU if `gpucnn tune` chose one, else the heuristic's; then fixed."""
        key = (pass_, g, numpy.dtype(dtype).name)
        config = self._choices.get(key)
        if config is None:
            if self._tuned is None:
                from ...tools import tune
                self._tuned = tune.choices_for(self.device_name) if self.device_name else {}
            from ...tools.tune import entry_key
            config = self._tuned.get(entry_key(pass_, g, dtype))
            if config not in CONV_CONFIGS:
                config = heuristic_config(pass_, g)
            self._choices[key] = config
        return config

    def _c(self, a):
        return self.xp.ascontiguousarray(a)

    def _geometry_args(self, g):
        return _i32(g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q, g.sh, g.sw, g.pt, g.pl,
                    g.dh, g.dw, g.groups)

    def _conv(self, kernel, pass_, dtype, g, config, grid, args):
        config = config or self.config_for(pass_, g, dtype)
        c = CONV_CONFIGS[config]
        grid = (_cdiv(grid[0], c.bm), _cdiv(grid[1], c.bn), grid[2])
        _check_grid(kernel, grid, g)
        f = self._function("conv2d.cu", kernel, dtype, config)
        f(grid, (_config_threads(c),), args, shared_mem=_smem_bytes(config, dtype))
        return config

    def conv2d_forward(self, x, weight, bias, g, config=None):
        """y (N, K, P, Q) = conv(x, weight) + bias: implicit GEMM, bias in the epilogue."""
        x, weight = self._c(x), self._c(weight)
        y = self.xp.empty((g.N, g.K, g.P, g.Q), dtype=x.dtype)
        if y.size == 0:
            return y
        bias_arg = weight if bias is None else self._c(bias)
        rows, cols, _, count = gemm_shape("forward", g)
        self._conv("conv2d_forward", "forward", x.dtype, g, config, (rows, cols, count),
                   (x, weight, bias_arg, y, *self._geometry_args(g),
                    numpy.int32(bias is not None)))
        return y

    def conv2d_backward_data(self, dy, weight, g, config=None):
        """dx (N, C, H, W): implicit GEMM per group and stride phase."""
        dy, weight = self._c(dy), self._c(weight)
        dx = self.xp.empty((g.N, g.C, g.H, g.W), dtype=dy.dtype)
        if dx.size == 0:
            return dx
        phases = self._phases.get(g)
        if phases is None:  # copied to the device once per shape, not at every step
            phases = self._phases[g] = self.xp.asarray(dgrad_phases(g))
        rows, cols, _, count = gemm_shape("backward_data", g)
        self._conv("conv2d_backward_data", "backward_data", dy.dtype, g, config,
                   (rows, cols, count), (dy, weight, dx, phases, *self._geometry_args(g)))
        return dx

    def conv2d_backward_filter(self, dy, x, g, config=None):
        """dweight (K, C/groups, R, S): implicit GEMM over (n,p,q), split into slices
        (filter_slices) that conv2d_sum_slices adds in order."""
        dy, x = self._c(dy), self._c(x)
        shape = (g.K, g.C // g.groups, g.R, g.S)
        if g.N * g.P * g.Q == 0:
            return self.xp.zeros(shape, dtype=dy.dtype)
        config = config or self.config_for("backward_filter", g, dy.dtype)
        slices, slice_len = filter_slices(g, config)
        rows, cols, _, count = gemm_shape("backward_filter", g)
        partial = self.xp.empty((slices, *shape), dtype=dy.dtype)
        self._conv("conv2d_backward_filter", "backward_filter", dy.dtype, g, config,
                   (rows, cols, count * slices),
                   (dy, x, partial, *self._geometry_args(g), *_i32(slices, slice_len)))
        return partial[0] if slices == 1 else self._sum_slices(partial)

    def _sum_slices(self, partial):
        out = self.xp.empty(partial.shape[1:], dtype=partial.dtype)
        f = self._function("conv2d_reduce.cu", "conv2d_sum_slices", partial.dtype)
        f((_cdiv(out.size, 32),), (32, REDUCE_LANES),
          (partial, out, numpy.int64(out.size), numpy.int32(partial.shape[0])),
          shared_mem=REDUCE_SHARED["conv2d_sum_slices"](partial.itemsize))
        return out

    def conv2d_backward_bias(self, dy):
        """dbias (K,): each of K x slices blocks sums one range of (n,p,q) in a fixed tree,
        then conv2d_sum_slices adds the slices in order."""
        dy = self._c(dy)
        N, K, P, Q = dy.shape
        length = N * P * Q
        if length == 0:
            return self.xp.zeros((K,), dtype=dy.dtype)
        if K > MAX_GRID_YZ:
            raise ValueError(f"conv2d_backward_bias: {K} channels exceed the grid limit of "
                             f"{MAX_GRID_YZ}")
        slices = max(1, min(_cdiv(TARGET_BLOCKS, K), _cdiv(length, 16 * THREADS)))
        slice_len = _cdiv(length, slices)
        slices = _cdiv(length, slice_len)
        partial = self.xp.empty((slices, K), dtype=dy.dtype)
        f = self._function("conv2d_reduce.cu", "conv2d_backward_bias", dy.dtype)
        f((slices, K), (THREADS,),
          (dy, partial, *_i32(N, K), numpy.int64(P * Q), numpy.int64(slice_len)),
          shared_mem=REDUCE_SHARED["conv2d_backward_bias"](dy.itemsize))
        return partial[0] if slices == 1 else self._sum_slices(partial)

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


def _device_name(xp, device):
    try:
        name = xp.cuda.runtime.getDeviceProperties(device)["name"]
    except Exception:  # a stand-in without device properties: no tuned choices
        return None
    return name.decode() if isinstance(name, bytes) else str(name)


def kernels_for(xp):
    """The Kernels serving arrays of the array module xp on its current device, or
    None where xp is NumPy (the CPU path). The one way an op asks for the kernels.

    Any CuPy-like module serves: the kernels are loaded through xp.RawModule
    (CuPy's, or a stand-in's), compiled on first use and cached per device.
    """
    if xp is numpy:
        return None
    device = xp.cuda.runtime.getDevice()
    key = (xp, device)
    if key not in _per_device:
        _per_device[key] = Kernels(xp, lambda code, names, options: xp.RawModule(
            code=code, options=options, name_expressions=names), _device_name(xp, device))
    return _per_device[key]
