"""The CUDA kernels, run on the CPU from their unedited .cu source through the
emulator, with the same launchers the GPU uses, against the NumPy path."""
import numpy
import pytest

from conftest import close
import emulator
from gpucnn.backends import cuda
from gpucnn.backends.cuda import conv as cuda_conv
from gpucnn.backends.cuda.kernels import Kernels
from gpucnn import functional as F
from gpucnn.functional import conv, pool
from cases import CONV_GRID

# Beyond test_conv2d's grid: ragged tile edges (rows past 128, K/groups = 65 and
# 70 past a 64 tile, C = 40), 1x1 and 7x7 filters, depthwise with stride 2 and
# dilation 2, a reduction long enough for several backward-filter slices.
CONV_GRID = CONV_GRID + [((3, 5, 13, 11), (7, 5, 3, 3), dict(padding=1)),
                         ((1, 1, 3, 3), (1, 1, 3, 3), {}),
                         ((2, 40, 6, 5), (70, 40, 1, 1), {}),
                         ((2, 8, 5, 5), (130, 4, 3, 3), dict(groups=2, stride=2)),
                         ((2, 6, 11, 11), (6, 1, 3, 3), dict(groups=6, stride=2, dilation=2,
                                                             padding=2)),
                         ((1, 3, 20, 20), (9, 3, 7, 7), dict(stride=2, padding=3)),
                         ((4, 2, 16, 16), (3, 2, 3, 3), dict(padding=1))]
DTYPES = [numpy.float64, numpy.float32]


@pytest.fixture(scope="module", params=emulator.ORDERS,
                ids=lambda o: f"order{o[0]}" + (f"-vs-{o[1]}" if o[1] is not None else ""))
def kernels(request):
    """The launchers on the emulator, outputs poisoned: in index order, then in
    a shuffled order checked bitwise against the reverse order."""
    order, compare_order = request.param
    return emulator.kernels(order, compare_order)


def _conv_case(rng, xs, ws, kw, dtype):
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    g = conv.geometry(x, w, b, **kw)
    dy = rng.standard_normal((g.N, g.K, g.P, g.Q)).astype(dtype)
    return x, w, b, g, dy


def _passes(kernels, x, w, b, g, dy, config):
    return (kernels.conv2d_forward(x, w, b, g, config=config),
            kernels.conv2d_forward(x, w, None, g, config=config),
            kernels.conv2d_backward_data(dy, w, g, config=config),
            kernels.conv2d_backward_filter(dy, x, g, config=config))


@pytest.mark.parametrize("config", sorted(cuda_conv.CONV_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, ws, kw", CONV_GRID)
def test_conv2d_every_configuration(kernels, rng, xs, ws, kw, dtype, config):
    x, w, b, g, dy = _conv_case(rng, xs, ws, kw, dtype)
    got = _passes(kernels, x, w, b, g, dy, config)
    dx, dw, _ = F.conv2d_backward(dy, x, w, **kw)
    expected = (F.conv2d(x, w, b, **kw), F.conv2d(x, w, None, **kw), dx, dw)
    for a, e, scale in zip(got, expected, (10, 10, 10, 100)):
        assert a.dtype == dtype and a.shape == e.shape
        close(a, e, dtype, scale=scale)
    # a fixed summation order: bitwise repeatable
    for a, e in zip(got, _passes(kernels, x, w, b, g, dy, config)):
        assert numpy.array_equal(a, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, ws, kw", CONV_GRID)
def test_conv2d_backward_bias_and_default_configuration(kernels, rng, xs, ws, kw, dtype):
    x, w, b, g, dy = _conv_case(rng, xs, ws, kw, dtype)
    db = kernels.conv2d_backward_bias(dy)
    close(db, dy.sum(axis=(0, 2, 3)), dtype, scale=100)
    assert numpy.array_equal(db, kernels.conv2d_backward_bias(dy))
    close(kernels.conv2d_forward(x, w, b, g), F.conv2d(x, w, b, **kw), dtype, scale=10)


def test_the_grid_has_several_filter_slices_and_a_one_slice_case():
    slices = set()
    for xs, ws, kw in CONV_GRID:
        x, w = numpy.zeros(xs), numpy.zeros(ws)
        g = conv.geometry(x, w, None, **kw)
        slices |= {cuda_conv.filter_slices(g, c)[0] for c in cuda_conv.CONV_CONFIGS}
    assert 1 in slices and max(slices) >= 4


def test_bias_gradient_in_many_slices(kernels, rng):
    dy = rng.standard_normal((3, 2, 40, 40))  # 4800 values per channel: several slices
    db = kernels.conv2d_backward_bias(dy)
    close(db, dy.sum(axis=(0, 2, 3)), numpy.float64, scale=100)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_launches_nothing(dtype):
    def refuse(code, names, options):
        raise AssertionError("a kernel was loaded for an empty batch")
    kernels = Kernels(numpy, refuse)
    x, w = numpy.zeros((0, 3, 8, 8), dtype), numpy.ones((4, 3, 3, 3), dtype)
    g = conv.geometry(x, w, None, padding=1)
    dy = numpy.zeros((0, 4, 8, 8), dtype)
    assert kernels.conv2d_forward(x, w, numpy.ones(4, dtype), g).shape == (0, 4, 8, 8)
    assert kernels.conv2d_backward_data(dy, w, g).shape == (0, 3, 8, 8)
    dw = kernels.conv2d_backward_filter(dy, x, g)
    assert dw.shape == w.shape and dw.dtype == dtype and not dw.any()
    db = kernels.conv2d_backward_bias(dy)
    assert db.shape == (4,) and not db.any()


def test_grid_limits_are_checked_before_a_launch():
    def refuse(code, names, options):
        raise AssertionError("loaded")
    kernels = Kernels(numpy, refuse)
    # depthwise over 70000 channels: 70000 groups would be a grid z past 65535
    x = numpy.zeros((1, 70000, 1, 1), numpy.float32)
    w = numpy.zeros((70000, 1, 1, 1), numpy.float32)
    g = conv.geometry(x, w, None, groups=70000)
    with pytest.raises(ValueError, match="65535"):
        kernels.conv2d_forward(x, w, None, g)
    for c in cuda_conv.CONV_CONFIGS:  # backward-filter's slices never push z past the limit
        slices = cuda_conv.filter_slices(g, c)[0]
        assert slices * g.groups <= 65535 or slices == 1


def test_heuristic_picks_narrow_tiles_for_narrow_layers():
    def g(N, C, H, K, R, **kw):
        return conv.geometry(numpy.zeros((N, C, H, H)), numpy.zeros((K, C, R, R)), None, **kw)
    lenet1, big = g(256, 1, 28, 32, 5, padding=2), g(64, 256, 14, 256, 3, padding=1)
    assert cuda_conv.heuristic_config("forward", lenet1) == "128x32"       # K = 32 columns
    assert cuda_conv.heuristic_config("backward_data", lenet1) == "128x32"  # C = 1 column
    assert cuda_conv.heuristic_config("backward_filter", lenet1) == "32x32"  # 32 x 25
    for p in cuda_conv.PASSES:
        assert cuda_conv.heuristic_config(p, big) == "128x128"
    assert cuda_conv.heuristic_config("forward", g(2, 64, 8, 64, 3, padding=1)) == "64x64"
    # C and K = 64 on a big batch: half of a 128-wide tile would be empty
    wide64 = g(32, 64, 56, 64, 3, padding=1)
    assert cuda_conv.heuristic_config("forward", wide64) == "128x64"        # K = 64 columns
    assert cuda_conv.heuristic_config("backward_data", wide64) == "128x64"  # C = 64 columns
    assert cuda_conv.heuristic_config("backward_filter", wide64) == "64x128"  # K = 64 rows


def _whole_stages(length, slices):
    """Whether `slices` slices of whole 16-value stages can split `length`: the slice
    length they round to gives that many slices again."""
    slice_len = (-(-length // slices) + 15) // 16 * 16
    return -(-length // slice_len) == slices


def _wave_fill(g, config, precision, itemsize, slices):
    c = cuda_conv.CONV_CONFIGS[config]
    rows, cols, _, count = cuda_conv.gemm_shape("backward_filter", g)
    blocks = -(-rows // c.bm) * -(-cols // c.bn) * count * slices
    wave = cuda_conv.WAVE_SMS * cuda_conv.resident_blocks(config, precision, itemsize)
    return blocks / (wave * -(-blocks // wave))


@pytest.mark.parametrize("precision, itemsize", [("fp32", 4), ("tf32", 4), ("3xtf32", 4),
                                                 ("fp32", 8)])
def test_split_k_fills_whole_waves(precision, itemsize):
    """Backward-filter's grid is planned in waves of the build's resident blocks: the
    fewest slices whose waves are 7/8 full, where the reduction is long enough and
    MAX_SLICES enough for any such, else the fullest; never a last wave of a few
    blocks. The 3x3 layer with C = K = 64 at
    batch 32 took 53 slices of 5 tiles before (265 blocks: a second wave of one)."""
    shapes = [(32, 64, 56, 64, 3), (64, 32, 14, 64, 5), (32, 128, 28, 128, 3),
              (32, 256, 14, 256, 3), (32, 512, 7, 512, 3), (128, 16, 32, 16, 3),
              (128, 64, 16, 128, 3), (256, 1, 28, 32, 5), (8, 3, 224, 64, 7),
              (3, 1280, 16, 1280, 1)]  # 100 big tiles, 3 slices at most: 1 is as full
    for N, C, H, K, R in shapes:
        g = conv.geometry(numpy.zeros((N, C, H, H)), numpy.zeros((K, C, R, R)), None,
                          padding=R // 2)
        length = N * g.P * g.Q
        for config in cuda_conv.CONV_CONFIGS:
            slices, slice_len = cuda_conv.filter_slices(g, config, precision, itemsize)
            assert slice_len % 16 == 0 and (slices - 1) * slice_len < length <= slices * slice_len
            fill = _wave_fill(g, config, precision, itemsize, slices)
            c = cuda_conv.CONV_CONFIGS[config]
            wave = cuda_conv.WAVE_SMS * cuda_conv.resident_blocks(config, precision, itemsize)
            assert wave * c.bm * c.bn <= 2 ** 22  # conv2d_backward_filter's bound on partial
            rows, cols, _, _ = cuda_conv.gemm_shape("backward_filter", g)
            tiles = -(-rows // c.bm) * -(-cols // c.bn)
            assert slices == 1 or tiles * slices < 14 * wave, (g, config, slices)
            fewer = [_wave_fill(g, config, precision, itemsize, s) for s in range(1, slices)
                     if _whole_stages(length, s)]
            assert slices <= cuda_conv.MAX_SLICES
            if fill >= cuda_conv.WAVE_FILL:
                assert all(f < cuda_conv.WAVE_FILL for f in fewer), (g, config, slices)
            else:  # too short, or too few tiles, for a full plan: the fullest of them
                cap = min(-(-length // cuda_conv.MIN_SLICE), cuda_conv.MAX_SLICES)
                plans = [_wave_fill(g, config, precision, itemsize, s) for s in range(1, cap + 1)
                         if _whole_stages(length, s)]
                assert max(plans) == fill and all(f < fill for f in fewer), (g, config, slices)
    g = conv.geometry(numpy.zeros((32, 64, 56, 56)), numpy.zeros((64, 64, 3, 3)), None, padding=1)
    assert _wave_fill(g, "64x128", "fp32", 4, cuda_conv.filter_slices(g, "64x128")[0]) > 0.85


def test_a_configuration_once_chosen_stays(kernels):
    g = conv.geometry(numpy.zeros((2, 3, 8, 8)), numpy.zeros((4, 3, 3, 3)), None)
    first = kernels.config_for("forward", g, numpy.float64)
    assert first == cuda_conv.heuristic_config("forward", g)
    assert kernels.config_for("forward", g, numpy.float64) == first


def test_non_contiguous_inputs_are_made_contiguous(kernels, rng):
    x = rng.standard_normal((2, 3, 8, 16))[..., ::2]
    g = pool.geometry(x, 2)
    y, idx = kernels.max_pool2d_forward(x, g)
    numpy.testing.assert_array_equal(y, F.max_pool2d(x, 2)[0])


def test_every_instantiation_of_every_configuration_loads(kernels):
    names = kernels.load_all()
    units = cuda.compile_units()
    assert len(names) == sum(len(u.name_expressions) for u in units)
    assert {u.config for u in units if u.filename == "conv2d.cu"} == {
        cuda_conv.build_label(c, p) for c in cuda_conv.CONV_CONFIGS
        for p in ("fp32", "tf32", "3xtf32")}
    for u in units:  # float and double, but the tensor-core builds are float-only
        assert len(u.name_expressions) == len(cuda.KERNELS[u.filename]) * (
            1 if u.config.endswith("tf32") else 2)
