"""The emulator's tensor-core instructions (tests/emulator/cuda_emu.h), run through
kernels/tensor_core.cuh from tests/kernels/mma_selftest.cu, against NumPy models
written from what the PTX ISA documents: cvt.rna.tf32.f32 bit for bit on every
float class, one mma.sync m16n8k8 on fragments laid out as the ISA's tables say,
and a GEMM of mmas under the kernel tests' thread orders. Then the self-test: a
fault planted in the GEMM (-D options) for each mistake a tensor-core kernel can
make, each shown caught, and the warp rules the emulator enforces."""
import functools
import pathlib
import re

import numpy
import pytest

import emulator
from emulator import EmulatedModule, LaunchError, OrderError
from gpucnn.backends.cuda import loader

SOURCE = pathlib.Path(__file__).resolve().parent / "mma_selftest.cu"
NAMES = ["round_tf32", "mma_fragments", "gemm_tf32"]
PLANTS = ("PLANT_SWAPPED_A", "PLANT_NO_SYNCWARP", "PLANT_UNROUNDED", "PLANT_PARTIAL_WARP")


def source():
    """mma_selftest.cu with kernels/tensor_core.cuh pasted in, as the loader does
    for the kernel files (loader.source), under #line markers."""
    text = SOURCE.read_text()

    def paste(m):
        line = text.count("\n", 0, m.start()) + 2
        return f'#line 1 "{m[1]}"\n{loader.source(m[1])}\n#line {line} "{SOURCE.name}"'
    return re.sub(r'^[ \t]*#[ \t]*include[ \t]+"([\w.]+)"[ \t]*$', paste, text, flags=re.M)


@functools.lru_cache(maxsize=None)
def selftest(plant=None, order=0, compare_order=None):
    options = () if plant is None else (f"-D{plant}",)
    return EmulatedModule(source(), NAMES, options, order=order, compare_order=compare_order)


def line_of(text):
    """The line of mma_selftest.cu that contains text (once)."""
    lines = [i for i, line in enumerate(SOURCE.read_text().split("\n"), 1) if text in line]
    assert len(lines) == 1, (text, lines)
    return lines[0]


# ---- NumPy references --------------------------------------------------------------
def tf32_rna_bits(bits):
    """cvt.rna.tf32.f32 on uint32 patterns, in integer arithmetic: a finite
    magnitude rounds to a multiple of 2^13 (half away from zero); infinities and
    NaNs lose their low 13 bits."""
    bits = numpy.asarray(bits, numpy.uint64)
    sign, magnitude = bits & 0x80000000, bits & 0x7FFFFFFF
    quotient, remainder = numpy.divmod(magnitude, 0x2000)
    rounded = numpy.where(magnitude < 0x7F800000, quotient + (remainder >= 0x1000), quotient)
    return (sign | rounded * 0x2000).astype(numpy.uint32)


def tf32_rna_values(x):
    """The same rounding for finite floats, computed on values instead of bits: the
    spacing of TF32 at |x| is 2^(e - 10) with e the exponent of |x|'s leading bit
    (at least -126, where float32 turns subnormal), and float64 holds |x| / spacing
    + 0.5 exactly."""
    x = numpy.asarray(x, numpy.float32).astype(numpy.float64)
    _, e = numpy.frexp(numpy.abs(x))
    spacing = numpy.ldexp(1.0, numpy.maximum(e - 1, -126) - 10)
    with numpy.errstate(over="ignore"):  # past the largest TF32: infinity, as the rounding has it
        return numpy.copysign(numpy.floor(numpy.abs(x) / spacing + 0.5) * spacing,
                              x).astype(numpy.float32)


def tf32_values(bits):
    """TF32 patterns as the MMA reads them (low 13 bits ignored), in float64."""
    bits = numpy.asarray(bits, numpy.uint32) & numpy.uint32(0xFFFFE000)
    return bits.view(numpy.float32).astype(numpy.float64)


def mma_model(a_bits, b_bits, c):
    """D = A B + C as the emulator's documented model: float64 products of the
    TF32 operands, summed onto C in increasing k, one rounding to float32."""
    a, b = tf32_values(a_bits), tf32_values(b_bits)
    acc = numpy.asarray(c, numpy.float32).astype(numpy.float64)
    for k in range(a.shape[1]):
        acc = acc + a[:, k, None] * b[None, k, :]
    return acc.astype(numpy.float32)


LANE = numpy.arange(32)
G, T = LANE >> 2, LANE & 3


def to_fragments(a, b, c):
    """The per-lane registers of one warp for A (16x8), B (8x8) and C (16x8), by
    the PTX ISA's tables for mma.m16n8k8 with .tf32 (g = lane >> 2, t = lane % 4)."""
    fa = numpy.stack([a[G, T], a[G + 8, T], a[G, T + 4], a[G + 8, T + 4]], axis=1)
    fb = numpy.stack([b[T, G], b[T + 4, G]], axis=1)
    fc = numpy.stack([c[G, 2 * T], c[G, 2 * T + 1], c[G + 8, 2 * T], c[G + 8, 2 * T + 1]], axis=1)
    return fa, fb, fc


def from_fragments(fd):
    d = numpy.full((16, 8), numpy.nan, numpy.float32)
    d[G, 2 * T], d[G, 2 * T + 1], d[G + 8, 2 * T], d[G + 8, 2 * T + 1] = fd.T
    return d


def gemm_model(a, b, rounding=tf32_rna_bits):
    """The GEMM kernel's result as the model has it: operands rounded (or not:
    rounding=None, and the MMA truncates them), one mma_model per 8 steps of k
    onto the float32 accumulator."""
    def operand(x):
        bits = x.view(numpy.uint32)
        return bits if rounding is None else rounding(bits)
    a_bits, b_bits = operand(a), operand(b)
    acc = numpy.zeros((a.shape[0], b.shape[1]), numpy.float32)
    for k0 in range(0, a.shape[1], 8):
        acc = mma_model(a_bits[:, k0:k0 + 8], b_bits[k0:k0 + 8], acc)
    return acc


# ---- cvt.rna.tf32.f32 --------------------------------------------------------------
def float_classes():
    """uint32 patterns of every float class: zeros, normals, exact ties and their
    neighbours at every exponent, carries into the exponent, the largest finite
    values, subnormals, infinities, quiet and signalling NaNs with payloads, and
    random patterns."""
    named = [0x00000000, 0x80000000, 0x3F800000, 0x3F801000, 0xBF801000, 0x3F800FFF, 0x3F801001,
             0xBF800FFF, 0xBF801001, 0x3F803000, 0x3FFFF000, 0x3FFFFFFF, 0xBFFFF000,
             0x7F7FFFFF, 0x7F7FF000, 0x7F7FEFFF, 0x7F7FE000, 0xFF7FFFFF, 0xFF7FF000,
             0x00800000, 0x00000001, 0x00000FFF, 0x00001000, 0x00001001, 0x00001FFF,
             0x00003000, 0x007FFFFF, 0x007FF000, 0x007FEFFF, 0x80001000, 0x807FFFFF,
             0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FC01234, 0x7FC01000,
             0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7F800FFF, 0x7F801000, 0x7FA00000, 0xFF800001]
    exponent = numpy.arange(255, dtype=numpy.uint32) << 23
    ties = [exponent | low for low in (0x1000, 0x3000, 0x0FFF, 0x1001, 0x7FF000, 0x7FFFFF)]
    rng = numpy.random.default_rng(21)
    normals = (rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)).astype(
        numpy.float32).view(numpy.uint32)
    negative_ties = [t | 0x80000000 for t in ties]
    return numpy.concatenate([numpy.array(named, numpy.uint32), *ties, *negative_ties, normals,
                              rng.integers(0, 2 ** 32, 20000, dtype=numpy.uint32)])


def round_on_emulator(bits):
    x = numpy.ascontiguousarray(bits, numpy.uint32).view(numpy.float32)
    out = emulator.poisoned.numpy.empty(x.size, numpy.uint32)
    selftest().get_function("round_tf32")((-(-x.size // 256),), (256,),
                                           (x, out, numpy.int32(x.size)))
    return out


def test_cvt_rna_is_bit_exact_on_every_float_class():
    bits = float_classes()
    got = round_on_emulator(bits)
    expected = tf32_rna_bits(bits)
    wrong = numpy.flatnonzero(got != expected)
    assert wrong.size == 0, [(hex(bits[i]), hex(got[i]), hex(expected[i])) for i in wrong[:10]]
    finite = (bits & 0x7FFFFFFF) < 0x7F800000  # the two references agree where both apply
    numpy.testing.assert_array_equal(tf32_rna_values(bits[finite].view(numpy.float32)).view(
        numpy.uint32), expected[finite])
    assert (got & 0x1FFF == 0).all()


@pytest.mark.parametrize("x, rounded", [
    (0x3F801000, 0x3F802000),  # a tie whose kept bit is even: away from zero, not to even
    (0xBF801000, 0xBF802000),  # and negative: away from zero is down
    (0x3F800FFF, 0x3F800000), (0x3F801001, 0x3F802000),
    (0x3FFFF000, 0x40000000),  # the carry moves into the exponent
    (0x80000000, 0x80000000),  # -0 keeps its sign
    (0x7F7FEFFF, 0x7F7FE000),  # the largest TF32 below infinity
    (0x7F7FF000, 0x7F800000), (0xFF7FFFFF, 0xFF800000),  # past it: infinity
    (0x00001000, 0x00002000), (0x00000FFF, 0x00000000),  # subnormals round as patterns,
    (0x007FF000, 0x00800000),  # into the normals too: no flush, whatever the kernel's FTZ
    (0x7F800000, 0x7F800000), (0xFF800000, 0xFF800000),
    (0x7FC00000, 0x7FC00000), (0x7FC01FFF, 0x7FC00000),  # NaNs are truncated, never rounded
    (0xFFFFFFFF, 0xFFFFE000),  # the emulator's poison stays NaN
    (0x7F800FFF, 0x7F800000),  # a NaN with its payload in the low 13 bits: infinity
])
def test_cvt_rna_cases(x, rounded):
    assert hex(round_on_emulator([x])[0]) == hex(rounded)


# ---- mma.sync m16n8k8 --------------------------------------------------------------
def random_tf32(rng, shape, spread=20):
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-spread, spread, shape)
    return tf32_rna_bits(x.astype(numpy.float32).view(numpy.uint32))


def run_mma_fragments(module, warps, block=None):
    """One mma per warp on random matrices: returns (A, B, C, D from the emulator)."""
    rng = numpy.random.default_rng(7)
    a = random_tf32(rng, (warps, 16, 8))
    b = random_tf32(rng, (warps, 8, 8))
    c = (rng.standard_normal((warps, 16, 8)) * 100).astype(numpy.float32)
    frags = [to_fragments(a[w], b[w], c[w]) for w in range(warps)]
    fa, fb, fc = (numpy.ascontiguousarray(numpy.concatenate([f[i] for f in frags]))
                  for i in range(3))
    fd = emulator.poisoned.numpy.empty((32 * warps, 4), numpy.float32)
    threads = block or 32 * warps
    module.get_function("mma_fragments")((32 * warps // threads,), (threads,), (fa, fb, fc, fd))
    return a, b, c, numpy.stack([from_fragments(fd[32 * w:32 * w + 32]) for w in range(warps)])


def test_the_documented_fragments_cover_each_matrix_once():
    fa, fb, fc = to_fragments(numpy.arange(128).reshape(16, 8), numpy.arange(64).reshape(8, 8),
                              numpy.arange(128).reshape(16, 8))
    assert sorted(fa.ravel()) == list(range(128)) and sorted(fb.ravel()) == list(range(64))
    assert sorted(fc.ravel()) == list(range(128))
    assert list(fa[5]) == [1 * 8 + 1, 9 * 8 + 1, 1 * 8 + 5, 9 * 8 + 5]  # lane 5: g = 1, t = 1


def test_one_mma_per_warp_follows_the_ptx_layouts_exactly():
    a, b, c, d = run_mma_fragments(selftest(), warps=3)  # each warp its own matrices
    for w in range(3):
        numpy.testing.assert_array_equal(d[w].view(numpy.uint32),
                                         mma_model(a[w], b[w], c[w]).view(numpy.uint32))
    av, bv = tf32_values(a), tf32_values(b)  # and the model is the product, to float32's rounding
    scale = numpy.abs(av) @ numpy.abs(bv) + numpy.abs(c)
    assert (numpy.abs(d - (av @ bv + c)) <= 2.0 ** -23 * scale).all()


def test_the_mma_ignores_the_low_13_bits_of_its_operands():
    rng = numpy.random.default_rng(3)
    a, b = random_tf32(rng, (16, 8)), random_tf32(rng, (8, 8))
    c = rng.standard_normal((16, 8)).astype(numpy.float32)
    noisy_a = a | rng.integers(0, 0x2000, a.shape).astype(numpy.uint32)
    noisy_b = b | rng.integers(0, 0x2000, b.shape).astype(numpy.uint32)
    fa, fb, fc = (numpy.ascontiguousarray(f) for f in to_fragments(noisy_a, noisy_b, c))
    fd = emulator.poisoned.numpy.empty((32, 4), numpy.float32)
    selftest().get_function("mma_fragments")((1,), (32,), (fa, fb, fc, fd))
    numpy.testing.assert_array_equal(from_fragments(fd), mma_model(a, b, c))


# ---- a GEMM of mmas, under the kernel tests' thread orders -------------------------
def gemm_case(m=64, n=32, k=40):
    rng = numpy.random.default_rng(11)
    return (rng.standard_normal((m, k)).astype(numpy.float32),
            rng.standard_normal((k, n)).astype(numpy.float32))


def run_gemm(module, a, b):
    (m, k), n = a.shape, b.shape[1]
    out = emulator.poisoned.numpy.empty((m, n), numpy.float32)
    module.get_function("gemm_tf32")((n // 16, m // 32), (128,),
                                     (a, b, out, numpy.int32(m), numpy.int32(n), numpy.int32(k)))
    return out


@pytest.mark.parametrize("order, compare_order", emulator.ORDERS)
def test_a_gemm_of_mmas_equals_the_model_bitwise(order, compare_order):
    a, b = gemm_case()
    got = run_gemm(selftest(order=order, compare_order=compare_order), a, b)
    numpy.testing.assert_array_equal(got.view(numpy.uint32), gemm_model(a, b).view(numpy.uint32))


# ---- the planted faults ------------------------------------------------------------
def test_a_wrong_lane_mapping_is_caught():
    a, b = gemm_case()
    got = run_gemm(selftest("PLANT_SWAPPED_A"), a, b)
    exact = a.astype(numpy.float64) @ b
    assert numpy.isfinite(got).all()
    assert (got != gemm_model(a, b)).mean() > 0.9
    # Not a rounding difference: whole products land in the wrong rows and columns.
    assert numpy.abs(got - exact).max() > 1.0


@pytest.mark.parametrize("order, compare_order", emulator.ORDERS)
def test_a_missing_syncwarp_is_caught(order, compare_order):
    a, b = gemm_case()
    module = selftest("PLANT_NO_SYNCWARP", order, compare_order)
    if compare_order is None:
        # Lanes read their fragments before the lanes that copy them ran: the 0xFF poison.
        assert numpy.isnan(run_gemm(module, a, b)).mean() > 0.5
    else:  # and which elements turn out poisoned follows the order
        with pytest.raises(OrderError, match="gemm_tf32: array argument 2 differs"):
            run_gemm(module, a, b)


def test_an_unrounded_operand_is_caught_and_is_the_truncated_model():
    a, b = gemm_case(64, 32, 256)
    got = run_gemm(selftest("PLANT_UNROUNDED"), a, b)
    rounded = gemm_model(a, b)
    assert (got != rounded).mean() > 0.9
    numpy.testing.assert_array_equal(got, gemm_model(a, b, rounding=None))
    # By how much: truncation errs one way, so over k = 256 its errors add up where
    # rounding's cancel (here 2.6 times the mean error against float64).
    exact = a.astype(numpy.float64) @ b
    truncated_error = numpy.abs(got - exact).mean()
    rounded_error = numpy.abs(rounded - exact).mean()
    assert truncated_error > 2 * rounded_error, (truncated_error, rounded_error)


def test_a_partial_warp_is_refused_naming_both_places():
    a, b = gemm_case()
    mma_line = line_of("tc::mma_tf32(acc, a, b, acc)")
    barrier_line = line_of("__syncthreads();  // before the next step")
    # tensor_core.cuh names its own line as the mma's place unless it passes on
    # its caller's (an emu::Site parameter under the emulator).
    mma_place = (f"{SOURCE.name}:{mma_line}" if "emu::Site" in loader.source("tensor_core.cuh")
                 else r"tensor_core.cuh:\d+")
    with pytest.raises(LaunchError, match=(
            rf"gemm_tf32: warp 0 of block \(0, 0, 0\) diverges at a warp-collective: thread "
            rf"\(0, 0, 0\) waits at the mma.sync at {mma_place}, thread \(5, 0, 0\) waits at "
            rf"the __syncthreads at {SOURCE.name}:{barrier_line} \(mma.sync.aligned must be "
            rf"executed by all 32 lanes")):
        run_gemm(selftest("PLANT_PARTIAL_WARP"), a, b)
    with pytest.raises(LaunchError, match=r"thread \(5, 0, 0\) has exited"):
        run_mma_fragments(selftest("PLANT_PARTIAL_WARP"), warps=1)


# ---- the warp rules, on small kernels --------------------------------------------
WARPS = r"""
// Lanes exchange values through shared memory: out[i] = in[i ^ 1] within each
// warp. Lanes at or past `live` return first; with `sync` the rest wait for
// each other at __syncwarp.
__global__ void swap_pairs(const float* in, float* out, int live, bool sync) {
    extern __shared__ unsigned char smem[];
    float* s = reinterpret_cast<float*>(smem);
    const int i = threadIdx.x;
    if (i >= live) return;
    s[i] = in[i];
    if (sync) __syncwarp();
    out[i] = (i ^ 1) < live ? s[i ^ 1] : 0.0f;
}

__global__ void partial_mask(float* out) {
    __syncwarp(0x0000ffff);
    out[threadIdx.x] = 1.0f;
}

// mode 0: the upper half of the warp calls the mma from another line;
// 1: it calls __syncwarp instead; 2: __syncthreads.
__global__ void divergent(float* out, int mode) {
    const unsigned a[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (threadIdx.x < 16) {
        emu::mma_m16n8k8_tf32(d, a, b, d);
    } else if (mode == 0) {
        emu::mma_m16n8k8_tf32(d, a, b, d);
    } else if (mode == 1) {
        __syncwarp();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = d[0];
}
"""


@pytest.fixture(scope="module")
def warps():
    return EmulatedModule(WARPS, ["swap_pairs", "partial_mask", "divergent"])


@pytest.mark.parametrize("threads, live", [(64, 64), (64, 50), (40, 40)])
def test_syncwarp_waits_for_the_lanes_that_have_not_exited(warps, threads, live):
    x = numpy.arange(1, threads + 1, dtype=numpy.float32)
    out = numpy.full(threads, -1, numpy.float32)
    f = warps.get_function("swap_pairs")
    f((1,), (threads,), (x, out, numpy.int32(live), numpy.bool_(True)), shared_mem=4 * threads)
    expected = numpy.where(numpy.arange(threads) ^ 1 < live, x[numpy.arange(threads) ^ 1], 0)
    expected[live:] = -1
    numpy.testing.assert_array_equal(out, expected)
    out[:] = -1  # and the exchange needs it: without, a lane reads its partner's poison
    f((1,), (threads,), (x, out, numpy.int32(live), numpy.bool_(False)), shared_mem=4 * threads)
    assert numpy.isnan(out).any()


def test_syncwarp_takes_only_the_full_mask(warps):
    with pytest.raises(LaunchError, match=r"__syncwarp\(0x0000ffff\) at kernel.cu:\d+ in warp 0 "
                                          r"of block \(0, 0, 0\): the emulator implements only"):
        warps.get_function("partial_mask")((1,), (32,), (numpy.zeros(32, numpy.float32),))


@pytest.mark.parametrize("mode, other", [(0, r"the mma.sync at kernel.cu:(\d+)"),
                                         (1, r"the __syncwarp at kernel.cu:\d+"),
                                         (2, r"the __syncthreads at kernel.cu:\d+")])
def test_lanes_at_different_collectives_are_refused(warps, mode, other):
    with pytest.raises(LaunchError, match=rf"warp 0 of block \(0, 0, 0\) diverges at a "
                                          rf"warp-collective: thread \(0, 0, 0\) waits at the "
                                          rf"mma.sync at kernel.cu:\d+, thread \(16, 0, 0\) "
                                          rf"waits at {other}") as caught:
        warps.get_function("divergent")((1,), (32,), (numpy.zeros(32, numpy.float32),
                                                      numpy.int32(mode)))
    lines = re.findall(r"kernel.cu:(\d+)", str(caught.value))
    assert lines[0] != lines[1]


def test_mma_needs_a_block_of_whole_warps():
    with pytest.raises(LaunchError, match=r"warp 1 of block \(0, 0, 0\) has 16 threads, and the "
                                          r"mma.sync at .* needs all 32 lanes \(a block size of "
                                          r"48 threads is not a multiple of 32\)"):
        run_mma_fragments(selftest(), warps=2, block=48)


# ---- NVRTC ---------------------------------------------------------------------------
@pytest.mark.parametrize("plant", (None,) + PLANTS)
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_the_selftest_compiles_with_nvrtc(arch, plant):
    from gpucnn.backends import cuda
    from gpucnn.tools import nvrtc
    if nvrtc.library() is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12; CI installs it)")
    if emulator.asan_enabled():
        pytest.skip("NVRTC cannot load its builtins library with libasan preloaded; the plain "
                    "run compiles this")
    options = cuda.NVRTC_OPTIONS + (() if plant is None else (f"-D{plant}",))
    ok, log, lowered = nvrtc.compile(source(), NAMES, arch=arch, options=options,
                                     filename=SOURCE.name)
    assert ok, log
    assert "warning" not in log.lower(), log
    assert sorted(lowered) == sorted(NAMES)
