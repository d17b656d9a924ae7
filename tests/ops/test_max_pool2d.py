import numpy
import pytest

from cases import MAX_POOL_GRID as GRID
from conftest import close
from gpucnn import functional as F
from gpucnn.tools import gradcheck


def _torch_pool(torch, x, dy, kw):
    tx = torch.tensor(x, requires_grad=True)
    y, idx = torch.nn.functional.max_pool2d(tx, return_indices=True, **kw)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), idx.numpy(), tx.grad.numpy()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("xs, kw", GRID)
def test_matches_torch(torch, rng, xs, kw, dtype, ties):
    x = rng.standard_normal(xs).astype(dtype)
    if ties:  # many equal maxima: the first in row-major order must win
        x = numpy.round(x).clip(0, 1)
    y, idx = F.max_pool2d(x, **kw)
    dy = rng.standard_normal(y.shape).astype(dtype)
    ty, tidx, tdx = _torch_pool(torch, x, dy, kw)
    assert y.dtype == dtype and idx.dtype == numpy.int64
    numpy.testing.assert_array_equal(y, ty)
    numpy.testing.assert_array_equal(idx, tidx)
    for geometry in ({}, kw):
        dx = F.max_pool2d_backward(dy, idx, x.shape, **geometry)
        assert dx.dtype == dtype
        close(dx, tdx, dtype)


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("xs, kw", GRID)
def test_nan_and_minus_infinity_match_torch(torch, rng, xs, kw, dtype):
    x = rng.standard_normal(xs).astype(dtype)
    x[rng.random(xs) < 0.15] = numpy.nan
    x[0, 0] = -numpy.inf  # whole planes of -inf: the first cell inside the input wins
    x[-1, -1, :, ::2] = -numpy.inf
    y, idx = F.max_pool2d(x, **kw)
    dy = rng.standard_normal(y.shape).astype(dtype)
    ty, tidx, tdx = _torch_pool(torch, x, dy, kw)
    numpy.testing.assert_array_equal(y, ty)
    numpy.testing.assert_array_equal(idx, tidx)
    close(F.max_pool2d_backward(dy, idx, x.shape, **kw), tdx, dtype)


def test_nan_and_minus_infinity_follow_torch(torch):
    x = numpy.array([[[[numpy.nan, 1, numpy.nan, 2], [3, 4, 5, 6]],
                      [[-numpy.inf] * 4, [-numpy.inf] * 4]]])
    kw = dict(kernel_size=2, stride=2, padding=1)
    y, idx = F.max_pool2d(x, **kw)
    ty, tidx = torch.nn.functional.max_pool2d(torch.tensor(x), return_indices=True, **kw)
    numpy.testing.assert_array_equal(y, ty.numpy())
    numpy.testing.assert_array_equal(idx, tidx.numpy())


def test_gradient_goes_to_the_winner_only():
    x = numpy.array([[[[1.0, 5.0, 5.0], [0.0, 2.0, 5.0], [0.0, 0.0, 0.0]]]])
    y, idx = F.max_pool2d(x, kernel_size=2, stride=1)
    dy = numpy.ones_like(y)
    dx = F.max_pool2d_backward(dy, idx, x.shape, kernel_size=2, stride=1)
    # windows (0,0) and (0,1) both pick x[0,1] (first maximum); (1,1) picks x[1,2]
    expected = numpy.zeros_like(x)
    expected[0, 0, 0, 1] = 2
    expected[0, 0, 1, 2] = 1
    expected[0, 0, 1, 1] = 1  # window (1,0) = [[0,2],[0,0]]
    numpy.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize("name", ["max_pool2d 2x2", "max_pool2d 3x3 s2 p1 ceil"])
def test_finite_differences(name, rng):
    inputs, fwd, bwd = gradcheck.cases(rng)[name]
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, stride=1, padding=1, dilation=2),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=1, dilation=(3, 2), ceil_mode=True),
])
def test_finite_differences_dilated(rng, kw):
    # distinct values 0.05 apart: no ties, so the max is differentiable
    x = rng.permutation((numpy.arange(2 * 2 * 7 * 6) - 42) * 0.05).reshape(2, 2, 7, 6)
    err = gradcheck.check(dict(x=x), lambda x: F.max_pool2d(x, **kw)[0],
                          lambda G, x: dict(x=F.max_pool2d_backward(
                              G, F.max_pool2d(x, **kw)[1], x.shape, **kw)), rng)
    assert err < gradcheck.TOLERANCE


def test_backward_adds_in_torchs_order(torch, rng):
    # overlapping dilated windows sharing winners: float32 sums in the same order
    x = numpy.round(rng.standard_normal((2, 3, 17, 15)), 1).astype(numpy.float32)
    kw = dict(kernel_size=3, stride=1, padding=1, dilation=2)
    y, idx = F.max_pool2d(x, **kw)
    dy = rng.standard_normal(y.shape).astype(numpy.float32)
    numpy.testing.assert_array_equal(F.max_pool2d_backward(dy, idx, x.shape, **kw),
                                     _torch_pool(torch, x, dy, kw)[2])


def test_dilation_reaches_the_spaced_cells():
    x = numpy.arange(25.0).reshape(1, 1, 5, 5)
    y, idx = F.max_pool2d(x, 2, stride=1, dilation=3)  # cells (h, w), (h+3, w), ...
    numpy.testing.assert_array_equal(idx[0, 0], [[18, 19], [23, 24]])
    numpy.testing.assert_array_equal(y, idx.astype(float))


def test_empty_batch():
    x = numpy.zeros((0, 3, 8, 8), numpy.float32)
    y, idx = F.max_pool2d(x, 3, 2, 1, dilation=2)
    assert y.shape == idx.shape == (0, 3, 3, 3) and y.dtype == numpy.float32
    dx = F.max_pool2d_backward(y, idx, x.shape, 3, 2, 1, 2)
    assert dx.shape == x.shape and dx.dtype == numpy.float32


@pytest.mark.parametrize("kw, exc, words", [
    (dict(kernel_size=0), ValueError, "kernel_size must be positive"),
    (dict(kernel_size=2, padding=2), ValueError, "at most half of kernel_size"),
    (dict(kernel_size=2, stride=(1, 0)), ValueError, "stride must be positive"),
    (dict(kernel_size=9), ValueError, "output height size"),
    (dict(kernel_size=2.5), TypeError, "kernel_size must be an int or a pair"),
    (dict(kernel_size=2, ceil_mode=1), TypeError, "ceil_mode must be a bool"),
    (dict(kernel_size=2, dilation=0), ValueError, "dilation must be positive"),
    (dict(kernel_size=2, dilation=True), TypeError, "dilation must be an int or a pair"),
    (dict(kernel_size=3, dilation=4), ValueError, "output height size"),
    # every tap of the first window in the padding or past the input (PyTorch
    # would return -inf with an index outside the input)
    (dict(kernel_size=2, stride=4, padding=1, dilation=9), ValueError,
     "window 0 along the height (8) outside the input"),
])
def test_bad_arguments(kw, exc, words):
    with pytest.raises(exc) as info:
        F.max_pool2d(numpy.zeros((1, 1, 8, 8)), **kw)
    assert words in str(info.value)


def test_backward_bad_arguments():
    dy, idx = numpy.zeros((1, 1, 4, 4)), numpy.zeros((1, 1, 4, 4), dtype=numpy.int64)
    with pytest.raises(TypeError, match="indices must be an integer array"):
        F.max_pool2d_backward(dy, idx.astype(float), (1, 1, 8, 8))
    with pytest.raises(ValueError, match="input_shape must be 4 positive ints"):
        F.max_pool2d_backward(dy, idx, (1, 8, 8))
    with pytest.raises(ValueError, match="batch and channels must match"):
        F.max_pool2d_backward(dy, idx, (2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(1, 1, 3, 3\)"):
        F.max_pool2d_backward(dy, idx, (1, 1, 6, 6), kernel_size=2)
