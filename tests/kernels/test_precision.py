"""The tensor-core precisions of the float32 convolutions (docs/precision.md), run on
the CPU through the emulator from the unedited kernels/conv2d.cu: each pass and tile
configuration within its derived error bound against float64, 3xtf32 within 3x of
the FP32 kernel's error, tf32 measurably coarser than both, the forward pass bit for
bit against a NumPy model of the MMA arithmetic, and every precision repeatable."""
import numpy
import pytest

import emulator
import gpucnn
from gpucnn import functional as F
from gpucnn.backends import precision
from gpucnn.backends.cuda import conv as cuda_conv, loader
from gpucnn.functional import conv

U, U_T = 2.0 ** -24, 2.0 ** -11  # FP32's and TF32's unit roundoff

# Shapes that reach every kind of tile edge the precisions could break: ragged rows
# and columns, a reduction that ends mid k8 step (C*R*S = 27, 5*9 = 45), groups with
# stride and dilation (backward-data's phases), several backward-filter slices.
GRID = [((2, 3, 9, 9), (16, 3, 3, 3), dict(padding=1)),
        ((2, 5, 7, 6), (40, 5, 3, 3), dict(stride=2, padding=1)),
        ((1, 8, 9, 9), (12, 4, 3, 3), dict(groups=2, dilation=2, padding=2)),
        ((3, 4, 20, 20), (8, 4, 1, 1), {})]
PASSES = ("forward", "backward_data", "backward_filter")


@pytest.fixture(scope="module")
def kernels():
    return emulator.kernels()


def _case(seed, xs, ws, kw):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(numpy.float32)
    w = rng.standard_normal(ws).astype(numpy.float32)
    g = conv.geometry(x, w, None, **kw)
    dy = rng.standard_normal((g.N, g.K, g.P, g.Q)).astype(numpy.float32)
    return x, w, g, dy


def _run(kernels, x, w, g, dy, config, precision_):
    return {"forward": kernels.conv2d_forward(x, w, None, g, config=config, precision=precision_),
            "backward_data": kernels.conv2d_backward_data(dy, w, g, config=config,
                                                          precision=precision_),
            "backward_filter": kernels.conv2d_backward_filter(dy, x, g, config=config,
                                                              precision=precision_)}


def _exact(x, w, dy, kw):
    """(float64 value, float64 sum of |products|) of each pass."""
    x64, w64, dy64 = (a.astype(numpy.float64) for a in (x, w, dy))
    dx, dw, _ = F.conv2d_backward(dy64, x64, w64, **kw)
    adx, adw, _ = F.conv2d_backward(abs(dy64), abs(x64), abs(w64), **kw)
    return ({"forward": F.conv2d(x64, w64, None, **kw), "backward_data": dx,
             "backward_filter": dw},
            {"forward": F.conv2d(abs(x64), abs(w64), None, **kw), "backward_data": adx,
             "backward_filter": adw})


def _relative_error(got, exact, absolute):
    """The error measured against the derived bound's scale: ||ŷ - y|| / ||A||."""
    return numpy.linalg.norm(got.astype(numpy.float64) - exact) / numpy.linalg.norm(absolute)


def _tf32_bound(absolute, length):
    n = -(-length // 8) + 64  # k8 steps, and room for the split-K slices added in order
    return (2 * U_T + U_T ** 2 + n * U / (1 - n * U) * (1 + U_T) ** 2) * absolute + 1e-30


def _lengths(g):
    Cg, Kg = g.C // g.groups, g.K // g.groups
    return {"forward": Cg * g.R * g.S, "backward_data": Kg * g.R * g.S,
            "backward_filter": g.N * g.P * g.Q}


@pytest.mark.parametrize("config", sorted(cuda_conv.CONV_CONFIGS))
@pytest.mark.parametrize("xs, ws, kw", GRID)
def test_every_precision_within_its_bound(kernels, xs, ws, kw, config):
    x, w, g, dy = _case(1, xs, ws, kw)
    exact, absolute = _exact(x, w, dy, kw)
    runs = {p: _run(kernels, x, w, g, dy, config, p) for p in precision.PRECISIONS}
    for pass_ in PASSES:
        errors = {p: _relative_error(runs[p][pass_], exact[pass_], absolute[pass_])
                  for p in runs}
        bound = _tf32_bound(absolute[pass_], _lengths(g)[pass_])
        excess = abs(runs["tf32"][pass_].astype(numpy.float64) - exact[pass_]) - bound
        assert excess.max() <= 0, f"{pass_}: tf32 past its bound by {excess.max():.3g}"
        # 3xtf32 carries FP32's accuracy; tf32 does not (so neither is the other in disguise)
        assert errors["3xtf32"] <= 3 * errors["fp32"] + 4 * U * U, (pass_, errors)
        assert errors["tf32"] > 30 * errors["3xtf32"], (pass_, errors)
        assert errors["tf32"] < 2 * U_T, (pass_, errors)


@pytest.mark.parametrize("p", precision.TENSOR_CORE)
def test_each_precision_is_bitwise_repeatable_under_two_thread_orders(p):
    x, w, g, dy = _case(2, *GRID[1])
    first = _run(emulator.kernels(2, 1), x, w, g, dy, None, p)
    again = _run(emulator.kernels(3), x, w, g, dy, None, p)
    for pass_ in PASSES:
        assert numpy.array_equal(first[pass_], again[pass_]), pass_


def _tf32(a):
    """cvt.rna.tf32.f32 in NumPy, for finite values: round the 13 low bits away,
    ties away from zero (on the magnitude's bits)."""
    bits = a.astype(numpy.float32).view(numpy.uint32)
    return ((bits + numpy.uint32(0x1000)) & numpy.uint32(0xFFFFE000)).view(numpy.float32)


def _model_forward(x, w, b, kw, p):
    """The forward pass as the tensor-core kernel computes it: the implicit GEMM's
    reduction (c', r, s) in order, 8 at a time, each step d = fl(c + sum of 8 exact
    products) in float64 rounded to float32 (3xtf32: three such steps, small*big,
    big*small, big*big), then the bias added in float32."""
    g = conv.geometry(x, w, b, **kw)
    cols = F.conv2d(x.astype(numpy.float64), numpy.eye(g.C * g.R * g.S).reshape(
        g.C * g.R * g.S, g.C, g.R, g.S), None, **kw)  # im2col through the convolution itself
    A = cols.transpose(0, 2, 3, 1).reshape(-1, g.C * g.R * g.S).astype(numpy.float32)
    B = w.reshape(g.K, -1).T.astype(numpy.float32)
    big_a, big_b = _tf32(A), _tf32(B)
    terms = [(big_a, big_b)]
    if p == "3xtf32":
        small_a, small_b = _tf32(A - big_a), _tf32(B - big_b)
        terms = [(small_a, big_b), (big_a, small_b), (big_a, big_b)]
    acc = numpy.zeros((A.shape[0], g.K), numpy.float32)
    for k0 in range(0, A.shape[1], 8):
        for a, bb in terms:
            s = acc.astype(numpy.float64)
            for k in range(k0, min(k0 + 8, A.shape[1])):
                s = s + a[:, k, None].astype(numpy.float64) * bb[None, k, :].astype(numpy.float64)
            acc = s.astype(numpy.float32)
    y = acc + b[None, :]
    return y.reshape(g.N, g.P, g.Q, g.K).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("config", ["128x32", "32x128", "32x32"])
@pytest.mark.parametrize("p", precision.TENSOR_CORE)
def test_forward_is_the_documented_mma_arithmetic_bit_for_bit(kernels, p, config):
    xs, ws, kw = (2, 3, 9, 9), (16, 3, 3, 3), dict(padding=1)  # C*R*S = 27: a ragged k8 step
    x, w, g, _ = _case(3, xs, ws, kw)
    b = numpy.random.default_rng(4).standard_normal(16).astype(numpy.float32)
    got = kernels.conv2d_forward(x, w, b, g, config=config, precision=p)
    numpy.testing.assert_array_equal(got, _model_forward(x, w, b, kw, p))


def test_precision_setting_picks_the_builds(kernels):
    x, w, g, dy = _case(5, *GRID[0])
    with gpucnn.conv_precision("3xtf32"):
        y = kernels.conv2d_forward(x, w, None, g)
    assert numpy.array_equal(y, kernels.conv2d_forward(x, w, None, g, precision="3xtf32"))
    previous = gpucnn.set_conv_precision(None)  # the GPU default: tf32, as PyTorch's
    try:
        assert gpucnn.get_conv_precision() == "tf32"
        assert numpy.array_equal(kernels.conv2d_forward(x, w, None, g),
                                 kernels.conv2d_forward(x, w, None, g, precision="tf32"))
    finally:
        gpucnn.set_conv_precision(previous)
    # float64 computes in FP64 at every setting; a GPU without TF32 runs FP32
    assert kernels.precision_for(numpy.float64, "tf32") == "fp32"
    with gpucnn.conv_precision("tf32"):
        assert kernels.precision_for(numpy.float64) == "fp32"


def test_tensor_core_builds_are_float_only_and_listed():
    units = {u.config: u for u in loader.compile_units(cuda_conv.FILES)
             if u.filename == "conv2d.cu"}
    for name in cuda_conv.CONV_CONFIGS:
        assert all("<double>" not in n for n in units[f"{name} tf32"].name_expressions)
        assert "-DCONV_MMA=3" in units[f"{name} 3xtf32"].options
        assert any("<double>" in n for n in units[name].name_expressions)


def test_unknown_precision_is_one_clear_error(kernels):
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'tf32', '3xtf32'\)"
                                         r", got 'bf16'"):
        gpucnn.set_conv_precision("bf16")
    x, w, g, _ = _case(6, *GRID[0])
    with pytest.raises(ValueError, match="precision must be one of"):
        kernels.conv2d_forward(x, w, None, g, precision="fp16")


def test_a_tensor_core_precision_on_the_cpu_warns_once():
    x = numpy.zeros((1, 1, 5, 5), numpy.float32)
    layer = gpucnn.Conv2D(1, 2, 3)
    with gpucnn.conv_precision("tf32"), pytest.warns(UserWarning, match="applies on a GPU only"):
        layer(x)
