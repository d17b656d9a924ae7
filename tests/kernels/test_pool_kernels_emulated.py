"""The pooling kernels (kernels/max_pool2d.cu, kernels/avg_pool2d.cu), run on the
CPU from their unedited source through the emulator with the launchers the GPU
uses, against the NumPy path, for float and double."""
import numpy
import pytest

import emulator
from conftest import close
from gpucnn.backends import cuda
from gpucnn.backends.cuda.kernels import Kernels
from gpucnn import functional as F
from gpucnn.functional import pool
from cases import AVG_POOL_DIVISORS as DIVISORS, AVG_POOL_GRID as AVG_GRID, MAX_POOL_GRID as MAX_GRID

DTYPES = [numpy.float64, numpy.float32]
# Ragged sizes: outputs and inputs that are not a multiple of the 256-thread
# block, and more of them than one block holds.
MAX_GRID = MAX_GRID + [((3, 5, 13, 11), dict(kernel_size=3, stride=2, ceil_mode=True)),
                       ((2, 3, 17, 19), dict(kernel_size=(3, 2), stride=1, padding=1,
                                             dilation=(2, 3), ceil_mode=True))]
AVG_GRID = AVG_GRID + [((3, 5, 13, 11), dict(kernel_size=3, stride=2, padding=1,
                                             ceil_mode=True)),
                       ((2, 3, 17, 19), dict(kernel_size=(4, 3), stride=1, padding=(2, 1)))]


@pytest.fixture(scope="module", params=emulator.ORDERS,
                ids=lambda o: f"order{o[0]}" + (f"-vs-{o[1]}" if o[1] is not None else ""))
def kernels(request):
    """The launchers on the emulator, outputs poisoned: in index order, then in
    a shuffled order checked bitwise against the reverse order."""
    return emulator.kernels(*request.param)


def _refusing_kernels():
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was loaded for an empty batch")
    return Kernels(numpy, refuse)


@pytest.mark.parametrize("special", ["none", "ties", "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xs, kw", MAX_GRID)
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
    close(dx, F.max_pool2d_backward(dy, idx, x.shape, **kw), dtype)
    assert numpy.array_equal(dx, kernels.max_pool2d_backward(dy, idx, g))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("include_pad, divisor", DIVISORS)
@pytest.mark.parametrize("xs, kw", AVG_GRID)
def test_avg_pool2d(kernels, rng, xs, kw, include_pad, divisor, dtype):
    kw = dict(kw, count_include_pad=include_pad, divisor_override=divisor)
    x = rng.standard_normal(xs).astype(dtype)
    g = pool.geometry(x, **kw)
    y = kernels.avg_pool2d_forward(x, g)
    assert y.dtype == dtype
    close(y, F.avg_pool2d(x, **kw), dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = kernels.avg_pool2d_backward(dy, g)
    assert dx.dtype == dtype and dx.shape == x.shape
    close(dx, F.avg_pool2d_backward(dy, x.shape, **kw), dtype)
    # a fixed summation order: bitwise repeatable
    assert numpy.array_equal(y, kernels.avg_pool2d_forward(x, g))
    assert numpy.array_equal(dx, kernels.avg_pool2d_backward(dy, g))


def test_non_contiguous_inputs_are_made_contiguous(kernels, rng):
    x = rng.standard_normal((2, 3, 8, 16))[..., ::2]
    g = pool.geometry(x, 2)
    numpy.testing.assert_array_equal(kernels.max_pool2d_forward(x, g)[0], F.max_pool2d(x, 2)[0])
    close(kernels.avg_pool2d_forward(x, g), F.avg_pool2d(x, 2), numpy.float64)
    dy = rng.standard_normal((2, 3, 4, 8))[..., ::2]
    close(kernels.avg_pool2d_backward(dy, g), F.avg_pool2d_backward(dy, x.shape, 2),
          numpy.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_launches_nothing(dtype):
    kernels = _refusing_kernels()
    x = numpy.zeros((0, 3, 9, 9), dtype)
    g = pool.geometry(x, 3, 2, 1, dilation=2, ceil_mode=True)
    y, idx = kernels.max_pool2d_forward(x, g)
    assert y.shape == idx.shape == (0, 3, g.P, g.Q) and y.dtype == dtype
    assert kernels.max_pool2d_backward(y, idx, g).shape == x.shape
    g = pool.geometry(x, 3, 2, 1, count_include_pad=False)
    y = kernels.avg_pool2d_forward(x, g)
    assert y.shape == (0, 3, g.P, g.Q) and y.dtype == dtype
    dx = kernels.avg_pool2d_backward(y, g)
    assert dx.shape == x.shape and dx.dtype == dtype


def test_the_pool_kernels_are_registered():
    assert cuda.KERNELS["avg_pool2d.cu"] == ("avg_pool2d_forward", "avg_pool2d_backward")
    assert cuda.KERNELS["max_pool2d.cu"] == ("max_pool2d_forward", "max_pool2d_backward")
