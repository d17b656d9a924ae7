"""The convolution kernels' launchers (kernels/conv2d.cu, kernels/conv2d_reduce.cu):
their tile configurations, GEMM shapes, split-K and stride-phase tables.

The three passes are implicit GEMMs that gather their matrices tile by tile into
shared memory. The tile configurations are defined here only (CONV_CONFIGS) and
reach the kernel as -D options. A configuration is picked per pass and shape:
the one `gpucnn tune` measured fastest on this GPU (tune_cache), else
heuristic_config; once picked for a shape it stays, so a run's results are
bitwise repeatable.
"""
import functools
import math
from collections import namedtuple

import numpy

from ...validate import choice
from .. import precision as precision_module
from . import tune_cache
from .loader import DEFAULT, MAX_GRID_YZ, THREADS, Build, KernelFile, cdiv, i32

# The implicit-GEMM tile configurations of kernels/conv2d.cu, the one place they
# are defined: rows x columns of a block tile (bm x bn), its reduction depth per
# stage (bk for float, bk_double for double, whose 8x8 accumulators take twice the
# registers), the outputs each thread holds (tm x tn) and the stages per main-loop iteration
# (unroll, even). They reach the kernel as -D options.
TileConfig = namedtuple("TileConfig", "bm bn bk bk_double tm tn unroll")
CONV_CONFIGS = {
    "128x128": TileConfig(128, 128, 16, 8, 8, 8, 2),  # big layers: 256 threads, 8x8 outputs each
    "128x64": TileConfig(128, 64, 16, 8, 8, 8, 2),    # big layers with C or K = 64: 128 threads
    "64x128": TileConfig(64, 128, 16, 8, 8, 8, 2),    # K = 64 rows of backward-filter: 128 threads
    "64x64": TileConfig(64, 64, 8, 4, 8, 8, 4),       # mid-size: 4x the blocks, of 64 threads
    "128x32": TileConfig(128, 32, 8, 4, 8, 8, 4),     # few GEMM columns (C or K <= 32): 64 threads
    "32x128": TileConfig(32, 128, 8, 2, 8, 8, 4),     # few GEMM rows (K <= 32, backward-filter)
    "32x32": TileConfig(32, 32, 8, 4, 8, 4, 8),       # both small: one warp, 8x4 outputs each
}
# The tensor-core builds of each configuration (precision tf32 and 3xtf32, float
# only): the same block tile, threads and stages, one warp per warp tile (wm x wn)
# of (wm/16) x (wn/8) m16n8k8 MMAs; each thread then holds wm/8 x wn/4 outputs.
WARP_TILES = {"128x128": (64, 32), "128x64": (64, 32), "64x128": (64, 32), "64x64": (64, 32),
              "128x32": (64, 32), "32x128": (32, 64), "32x32": (32, 32)}
MMA = {"fp32": 0, "tf32": 1, "3xtf32": 3}  # -DCONV_MMA of each precision
SMEM_PAD = 4         # floats of padding per shared-memory row (-DCONV_PAD): rows are bm+4
                     # and bn+4 long, the 8 k-rows a warp stores at once on different banks
MMA_SMEM_PAD = 8     # the tensor-core builds': rows 8 mod 32 words apart put the float4
                     # fragment reads of 8 lanes (4 k-rows, 2 runs) on distinct banks
REDUCE_LANES = 8     # slice lanes per output in conv2d_sum_slices (blockDim.y)
TARGET_BLOCKS = 264  # ~2 blocks per SM of a 132-SM GPU: the bias grid aims here; a
                     # constant, so that a shape's summation order is the same on every GPU
MIN_SLICE = 256      # reduction values per split-K slice, at least (16 float stages)
MAX_SLICES = 256     # split-K slices at most: conv2d_sum_slices adds an output's slices one
                     # by one, REDUCE_LANES lanes each, so that sum stays short
WAVE_SMS = 132       # the SMs split-K plans its waves for (H100, H200), a constant likewise
WAVE_FILL = 7 / 8    # split-K takes the fewest slices whose waves are this full on average
# Blocks of each build's backward-filter kernel that one sm_90 SM holds at once (its
# registers limit them; tests/kernels/test_kernel_report.py holds every entry to the
# compiled kernel): a wave of split-K's grid is WAVE_SMS times as many blocks.
#                     float: fp32 tf32 3xtf32   double
RESIDENT_BLOCKS = {"128x128": (1, 1, 1, 1), "128x64": (3, 3, 2, 2), "64x128": (2, 2, 2, 2),
                   "64x64": (6, 6, 6, 4), "128x32": (6, 6, 6, 4), "32x128": (4, 4, 4, 4),
                   "32x32": (16, 16, 16, 12)}
PASSES = ("forward", "backward_data", "backward_filter")


def config_threads(c):
    """The threads per block of a TileConfig: one per tm x tn outputs of the tile."""
    return (c.bm // c.tm) * (c.bn // c.tn)


def build_label(config, precision="fp32"):
    """The loader's label of a configuration's build for a precision: '128x128' (the
    FP32 kernels, float and double), '128x128 tf32', '128x128 3xtf32' (float only)."""
    return config if precision == "fp32" else f"{config} {precision}"


def conv_options(config, precision="fp32"):
    """The -D options that compile kernels/conv2d.cu with a named configuration, for a
    precision (the tensor-core builds add their warp tile and MMA mode)."""
    c = CONV_CONFIGS[config]
    tm, tn, pad, extra = c.tm, c.tn, SMEM_PAD, ()
    if precision != "fp32":
        wm, wn = WARP_TILES[config]
        tm, tn, pad = wm // 8, wn // 4, MMA_SMEM_PAD
        extra = (f"-DCONV_WM={wm}", f"-DCONV_WN={wn}")
    return (f"-DCONV_BM={c.bm}", f"-DCONV_BN={c.bn}", f"-DCONV_BK={c.bk}",
            f"-DCONV_BK_DOUBLE={c.bk_double}", f"-DCONV_TM={tm}", f"-DCONV_TN={tn}",
            f"-DCONV_UNROLL={c.unroll}", f"-DCONV_PAD={pad}", f"-DCONV_MMA={MMA[precision]}",
            *extra)


def smem_bytes(config, itemsize, precision="fp32"):
    """The dynamic shared memory of a configuration's block: two stages of an A and a
    B tile, bk rows each (bk_double for double)."""
    c = CONV_CONFIGS[config]
    bk = c.bk if itemsize == 4 else c.bk_double
    pad = SMEM_PAD if precision == "fp32" else MMA_SMEM_PAD
    return 2 * bk * (c.bm + pad + c.bn + pad) * itemsize


def _build(config, precision):
    c, (wm, wn) = CONV_CONFIGS[config], WARP_TILES[config]
    # the kernel counts its threads from the warp tiles: one warp per warp tile
    assert 32 * (c.bm // wm) * (c.bn // wn) == config_threads(c), (config, WARP_TILES[config])
    threads = dict.fromkeys(CONV_KERNELS, config_threads(c))
    shared = dict.fromkeys(CONV_KERNELS, functools.partial(smem_bytes, config,
                                                           precision=precision))
    types = ("float", "double") if precision == "fp32" else ("float",)
    return Build(conv_options(config, precision), threads, shared, types)


CONV_KERNELS = ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter")
CONV_FILE = KernelFile("conv2d.cu", CONV_KERNELS, {
    build_label(name, p): _build(name, p) for p in precision_module.PRECISIONS
    for name in CONV_CONFIGS})
REDUCE_FILE = KernelFile("conv2d_reduce.cu", ("conv2d_sum_slices", "conv2d_backward_bias"), {
    DEFAULT: Build((f"-DREDUCE_LANES={REDUCE_LANES}",),
                   {"conv2d_sum_slices": 32 * REDUCE_LANES, "conv2d_backward_bias": THREADS},
                   {"conv2d_sum_slices": lambda itemsize: 32 * REDUCE_LANES * itemsize,
                    "conv2d_backward_bias": lambda itemsize: THREADS * itemsize})})
FILES = (CONV_FILE, REDUCE_FILE)


def gemm_shape(pass_, g):
    """(rows, columns, reduction length, independent GEMMs) of a convolution pass, as
    kernels/conv2d.cu sets it up; backward-data's GEMMs are one per group and stride
    phase, the largest phase's rows counted."""
    Cg, Kg = g.C // g.groups, g.K // g.groups
    if pass_ == "forward":
        return g.N * g.P * g.Q, Kg, Cg * g.R * g.S, g.groups
    if pass_ == "backward_data":
        rows = g.N * cdiv(g.H, g.sh) * cdiv(g.W, g.sw)
        return rows, Cg, Kg * cdiv(g.R, g.sh) * cdiv(g.S, g.sw), g.groups * g.sh * g.sw
    if pass_ == "backward_filter":
        return Kg, Cg * g.R * g.S, g.N * g.P * g.Q, g.groups
    raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")


def heuristic_config(pass_, g):
    """The tile configuration for a pass and shape when none was tuned: narrow tiles
    where a GEMM side is <= 32, else the big tile when its blocks fill a large GPU once
    (backward-filter always, its split-K fills the GPU) and 64x64 when they do not; a
    side of at most 64 takes the big tile's half (128x64, 64x128), which a 128-wide
    tile would leave half empty."""
    rows, cols, _, count = gemm_shape(pass_, g)
    if rows <= 32 and cols <= 32:
        return "32x32"
    if cols <= 32:
        return "128x32"
    if rows <= 32:
        return "32x128"
    if pass_ == "backward_filter":
        if cols >= 128:
            return "128x128" if rows >= 128 else "64x128" if rows <= 64 else "64x64"
        return "64x64"
    wide = 128 if cols > 64 else 64
    big = cdiv(rows, 128) * cdiv(cols, wide) * count
    if big < WAVE_SMS:  # no full wave of big tiles
        return "64x64"
    return "128x128" if wide == 128 else "128x64"


def resident_blocks(config, precision="fp32", itemsize=4):
    """RESIDENT_BLOCKS of a configuration's build for a precision and element size."""
    fp32, tf32, tf32x3, double = RESIDENT_BLOCKS[config]
    return double if itemsize == 8 else {"fp32": fp32, "tf32": tf32, "3xtf32": tf32x3}[precision]


@functools.lru_cache(maxsize=None)
def filter_slices(g, config, precision="fp32", itemsize=4):
    """(slices, slice_len) of backward-filter's split of its N*P*Q reduction into
    slices of whole stages, each at least MIN_SLICE long, MAX_SLICES at most. The
    grid of tiles x slices blocks runs in waves of WAVE_SMS x resident_blocks: the
    plan is the fewest slices whose waves are at least WAVE_FILL full on average (a
    last wave of a few blocks costs as much as a full one), else the fullest. A
    function of the shape and the build alone, so the summation order is fixed."""
    c = CONV_CONFIGS[config]
    rows, cols, length, count = gemm_shape("backward_filter", g)
    tiles = cdiv(rows, c.bm) * cdiv(cols, c.bn) * count
    wave = WAVE_SMS * resident_blocks(config, precision, itemsize)
    most = max(1, min(cdiv(length, MIN_SLICE), MAX_GRID_YZ // g.groups, MAX_SLICES))

    def plan(asked):  # (slices, slice_len, fill of the waves) for `asked` slices
        slice_len = cdiv(cdiv(length, asked), 16) * 16
        slices = cdiv(length, slice_len)
        return slices, slice_len, tiles * slices / (wave * cdiv(tiles * slices, wave))

    best = plan(1)
    for asked in range(1, most + 1):
        p = plan(asked)
        if p[2] >= WAVE_FILL:
            return p[:2]
        best = p if p[2] > best[2] else best
    return best[:2]


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
        count = max(0, cdiv(size - first, stride))
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


def _check_grid(name, grid, g):
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"{name}: the launch grid {grid} exceeds the limit of {MAX_GRID_YZ} "
                         f"blocks in y or z for {g}")
    if max(g.N * g.C * g.H * g.W, g.N * g.K * g.P * g.Q, g.K * g.C * g.R * g.S) >= 2 ** 31:
        raise ValueError(f"{name}: a tensor of {g} has 2**31 elements or more, past the "
                         "32-bit indices of the convolution kernels")


def _geometry_args(g):
    return i32(g.N, g.C, g.H, g.W, g.K, g.R, g.S, g.P, g.Q, g.sh, g.sw, g.pt, g.pl,
               g.dh, g.dw, g.groups)


class ConvLaunchers:
    """The convolution passes on one device (a part of kernels.Kernels, with a Loader).
    config: a CONV_CONFIGS name, or None for config_for's choice; precision: one of
    precision.PRECISIONS, or None for the setting (precision.for_dtype). A GPU
    without TF32 tensor cores (before compute capability 8.0) says so with
    tensor_cores=False and runs every precision in FP32, as PyTorch does."""

    def __init__(self, *args, tensor_cores=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.tensor_cores = tensor_cores
        self._choices = {}  # (pass, shape, dtype, precision) -> configuration: fixed once chosen
        self._phases = {}   # geometry -> its dgrad_phases table on the device
        self._tuned = None

    def precision_for(self, dtype, precision=None):
        """The precision a convolution of this dtype runs with here."""
        if precision is not None:
            choice(precision, "precision", precision_module.PRECISIONS)
        if precision is None or not self.tensor_cores or numpy.dtype(dtype) != numpy.float32:
            return precision_module.for_dtype(dtype, self.tensor_cores)
        return precision

    def config_for(self, pass_, g, dtype, precision="fp32"):
        """The configuration a pass runs with for this shape, dtype and precision: the
        tuned one for this GPU if `gpucnn tune` chose one, else the heuristic's; then
        fixed."""
        key = (pass_, g, numpy.dtype(dtype).name, precision)
        config = self._choices.get(key)
        if config is None:
            if self._tuned is None:
                self._tuned = (tune_cache.choices_for(self.device_name, known=CONV_CONFIGS)
                               if self.device_name else {})
            config = self._tuned.get(tune_cache.entry_key(pass_, g, dtype, precision))
            if config not in CONV_CONFIGS:
                config = heuristic_config(pass_, g)
            self._choices[key] = config
        return config

    def _conv(self, kernel, pass_, dtype, g, config, precision, grid, args):
        config = config or self.config_for(pass_, g, dtype, precision)
        c = CONV_CONFIGS[config]
        grid = (cdiv(grid[0], c.bm), cdiv(grid[1], c.bn), grid[2])
        _check_grid(kernel, grid, g)
        self._launch(CONV_FILE, kernel, dtype, grid, (config_threads(c),), args,
                     build_label(config, precision))
        return config

    def conv2d_forward(self, x, weight, bias, g, config=None, precision=None):
        """y (N, K, P, Q) = conv(x, weight) + bias: implicit GEMM, bias in the epilogue."""
        x, weight = self._c(x), self._c(weight)
        y = self.xp.empty((g.N, g.K, g.P, g.Q), dtype=x.dtype)
        if y.size == 0:
            return y
        bias_arg = weight if bias is None else self._c(bias)
        rows, cols, _, count = gemm_shape("forward", g)
        self._conv("conv2d_forward", "forward", x.dtype, g, config,
                   self.precision_for(x.dtype, precision), (rows, cols, count),
                   (x, weight, bias_arg, y, *_geometry_args(g), numpy.int32(bias is not None)))
        return y

    def conv2d_backward_data(self, dy, weight, g, config=None, precision=None):
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
                   self.precision_for(dy.dtype, precision), (rows, cols, count), (dy, weight, dx, phases, *_geometry_args(g)))
        return dx

    def conv2d_backward_filter(self, dy, x, g, config=None, precision=None):
        """dweight (K, C/groups, R, S): implicit GEMM over (n,p,q), split into slices
        (filter_slices) that conv2d_sum_slices adds in order."""
        dy, x = self._c(dy), self._c(x)
        shape = (g.K, g.C // g.groups, g.R, g.S)
        if g.N * g.P * g.Q == 0:
            return self.xp.zeros(shape, dtype=dy.dtype)
        precision = self.precision_for(dy.dtype, precision)
        config = config or self.config_for("backward_filter", g, dy.dtype, precision)
        slices, slice_len = filter_slices(g, config, precision, numpy.dtype(dy.dtype).itemsize)
        rows, cols, _, count = gemm_shape("backward_filter", g)
        partial = self.xp.empty((slices, *shape), dtype=dy.dtype)
        self._conv("conv2d_backward_filter", "backward_filter", dy.dtype, g, config,
                   precision, (rows, cols, count * slices),
                   (dy, x, partial, *_geometry_args(g), *i32(slices, slice_len)))
        return partial[0] if slices == 1 else self._sum_slices(partial)

    def _sum_slices(self, partial):
        out = self.xp.empty(partial.shape[1:], dtype=partial.dtype)
        self._launch(REDUCE_FILE, "conv2d_sum_slices", partial.dtype,
                     (cdiv(out.size, 32),), (32, REDUCE_LANES),
                     (partial, out, numpy.int64(out.size), numpy.int32(partial.shape[0])))
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
        slices = max(1, min(cdiv(TARGET_BLOCKS, K), cdiv(length, 16 * THREADS)))
        slice_len = cdiv(length, slices)
        slices = cdiv(length, slice_len)
        partial = self.xp.empty((slices, K), dtype=dy.dtype)
        self._launch(REDUCE_FILE, "conv2d_backward_bias", dy.dtype, (slices, K), (THREADS,),
                     (dy, partial, *i32(N, K), numpy.int64(P * Q), numpy.int64(slice_len)))
        return partial[0] if slices == 1 else self._sum_slices(partial)
