"""The CUDA kernels, run on the CPU from their unedited .cu source through the
emulator, with the same launchers the GPU uses, against the NumPy path."""
import numpy
import pytest

from conftest import close
import emulator
from gpucnn import cuda, functional as F
from gpucnn.functional import conv, pool
from test_conv2d import GRID as CONV_GRID
from test_max_pool2d import GRID as POOL_GRID

# ragged sizes (not a multiple of the 256-thread block), reductions longer than a
# block, weight-gradient tiles past 64 rows and columns (also within a group),
# one slice and many slices of the N*P*Q reduction
CONV_GRID = CONV_GRID + [((3, 5, 13, 11), (7, 5, 3, 3), dict(padding=1)),
                         ((1, 1, 3, 3), (1, 1, 3, 3), {}),
                         ((2, 8, 6, 5), (70, 8, 3, 3), dict(padding=1)),
                         ((2, 8, 5, 5), (130, 4, 3, 3), dict(groups=2, stride=2)),
                         ((4, 2, 30, 30), (3, 2, 3, 3), {})]
POOL_GRID = POOL_GRID + [((3, 5, 13, 11), dict(kernel_size=3, stride=2, ceil_mode=True))]
DTYPES = [numpy.float64, numpy.float32]


@pytest.fixture(scope="module", params=emulator.ORDERS,
                ids=lambda o: f"order{o[0]}" + (f"-vs-{o[1]}" if o[1] is not None else ""))
def kernels(request):
    """The launchers on the emulator, outputs poisoned: in index order, then in
    a shuffled order checked bitwise against the reverse order."""
    order, compare_order = request.param
    return emulator.kernels(order, compare_order)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, ws, kw", CONV_GRID)
def test_conv2d_backward(kernels, rng, xs, ws, kw, dtype):
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    g = conv.geometry(x, w, None, **kw)
    dy = rng.standard_normal((g.N, g.K, g.P, g.Q)).astype(dtype)
    dx, dw, db = F.conv2d_backward(dy, x, w, **kw)
    got = (kernels.conv2d_backward_data(dy, w, g), kernels.conv2d_backward_filter(dy, x, g),
           kernels.conv2d_backward_bias(dy))
    for a, b, scale in zip(got, (dx, dw, db), (10, 100, 100)):
        assert a.dtype == dtype and a.shape == b.shape
        close(a, b, dtype, scale=scale)
    again = (kernels.conv2d_backward_data(dy, w, g), kernels.conv2d_backward_filter(dy, x, g),
             kernels.conv2d_backward_bias(dy))
    for a, b in zip(got, again):  # a fixed summation order: bitwise repeatable
        assert numpy.array_equal(a, b)


@pytest.mark.parametrize("special", ["none", "ties", "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, kw", POOL_GRID)
def test_max_pool2d(kernels, rng, xs, kw, dtype, special):
    x = rng.standard_normal(xs).astype(dtype)
    if special == "ties":
        x = numpy.round(x).clip(0, 1)
    elif special == "nan":
        x[rng.random(xs) < 0.1] = numpy.nan
        x[0, 0] = -numpy.inf
    g = pool.geometry(x, **kw)
    y, idx = F.max_pool2d(x, **kw)
    y2, idx2 = kernels.max_pool2d_forward(x, g)
    numpy.testing.assert_array_equal(y2, y)
    numpy.testing.assert_array_equal(idx2, idx)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = kernels.max_pool2d_backward(dy, idx, g)
    assert dx.dtype == dtype
    close(dx, F.max_pool2d_backward(dy, idx, x.shape), dtype)
    assert numpy.array_equal(dx, kernels.max_pool2d_backward(dy, idx, g))


def test_non_contiguous_inputs_are_made_contiguous(kernels, rng):
    x = rng.standard_normal((2, 3, 8, 16))[..., ::2]
    g = pool.geometry(x, 2)
    y, idx = kernels.max_pool2d_forward(x, g)
    numpy.testing.assert_array_equal(y, F.max_pool2d(x, 2)[0])


def test_every_instantiation_loads(kernels):
    names = kernels.load_all()
    assert len(names) == 2 * sum(len(k) for k in cuda.KERNELS.values())
