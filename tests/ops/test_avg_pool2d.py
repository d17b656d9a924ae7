import numpy
import pytest

from cases import AVG_POOL_DIVISORS as DIVISORS, AVG_POOL_GRID as GRID
from conftest import close
from gpucnn import functional as F
from gpucnn.tools import gradcheck


def _torch_pool(torch, x, dy, kw):
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(tx, **kw)
    ty.backward(torch.tensor(dy))
    return ty.detach().numpy(), tx.grad.numpy()


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("include_pad, divisor", DIVISORS)
@pytest.mark.parametrize("xs, kw", GRID)
def test_matches_torch(torch, rng, xs, kw, include_pad, divisor, dtype):
    kw = dict(kw, count_include_pad=include_pad, divisor_override=divisor)
    x = rng.standard_normal(xs).astype(dtype)
    y = F.avg_pool2d(x, **kw)
    dy = rng.standard_normal(y.shape).astype(dtype)
    ty, tdx = _torch_pool(torch, x, dy, kw)  # in x's dtype: float32 against float32 too
    dx = F.avg_pool2d_backward(dy, x.shape, **kw)
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    close(y, ty, dtype)
    close(dx, tdx, dtype)
    if dtype == numpy.float32:  # and against PyTorch's float64
        ty, tdx = _torch_pool(torch, x.astype(float), dy.astype(float), kw)
        close(y, ty, dtype)
        close(dx, tdx, dtype)


def test_nan_spreads_like_torch(torch, rng):
    x = rng.standard_normal((1, 2, 6, 5))
    x[0, 0, 2, 3] = numpy.nan
    kw = dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)
    numpy.testing.assert_array_equal(numpy.isnan(F.avg_pool2d(x, **kw)),
                                     numpy.isnan(_torch_pool(torch, x, x[:, :, :3, :3], kw)[0]))


def test_gradient_is_shared_equally():
    dx = F.avg_pool2d_backward(numpy.array([[[[4.0]]]]), (1, 1, 2, 2), kernel_size=2)
    numpy.testing.assert_array_equal(dx, numpy.ones((1, 1, 2, 2)))


def test_count_include_pad_false_divides_by_the_cells_inside():
    x = numpy.ones((1, 1, 3, 3))
    y_in = F.avg_pool2d(x, 3, stride=1, padding=1)
    y_out = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    numpy.testing.assert_array_equal(y_in[0, 0], [[4 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 6 / 9],
                                                  [4 / 9, 6 / 9, 4 / 9]])
    numpy.testing.assert_array_equal(y_out, numpy.ones((1, 1, 3, 3)))
    assert F.avg_pool2d(x, 3, divisor_override=2)[0, 0, 0, 0] == 4.5


@pytest.mark.parametrize("name", ["avg_pool2d 2x2", "avg_pool2d 3x2 s2 p1 ceil"])
def test_finite_differences(name, rng):
    inputs, fwd, bwd = gradcheck.cases(rng)[name]
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


@pytest.mark.parametrize("kw", [
    dict(kernel_size=(3, 2), stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=3, stride=1, padding=1, divisor_override=5),
])
def test_finite_differences_divisors(rng, kw):
    x = rng.standard_normal((2, 2, 7, 6))
    err = gradcheck.check(dict(x=x), lambda x: F.avg_pool2d(x, **kw),
                          lambda G, x: dict(x=F.avg_pool2d_backward(G, x.shape, **kw)), rng)
    assert err < gradcheck.TOLERANCE


def test_empty_batch():
    x = numpy.zeros((0, 3, 8, 8))
    y = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    assert y.shape == (0, 3, 4, 4)
    assert F.avg_pool2d_backward(y, x.shape, 3, 2, 1).shape == x.shape


def test_bad_arguments():
    with pytest.raises(ValueError, match="at most half of kernel_size"):
        F.avg_pool2d(numpy.zeros((1, 1, 8, 8)), 3, padding=2)
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        F.avg_pool2d(numpy.zeros((1, 1, 8, 8), dtype=numpy.int32), 2)
    with pytest.raises(ValueError, match="input_shape must be 4 positive ints"):
        F.avg_pool2d_backward(numpy.zeros((1, 1, 4, 4)), (1, 8, 8), 2)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(1, 1, 4, 4\)"):
        F.avg_pool2d_backward(numpy.zeros((1, 1, 3, 4)), (1, 1, 8, 8), 2)
    with pytest.raises(ValueError, match=r"divisor_override must be a nonzero int below 2\*\*31 "
                                         r"in magnitude, got 0"):
        F.avg_pool2d(numpy.zeros((1, 1, 8, 8)), 2, divisor_override=0)
    with pytest.raises(TypeError, match="divisor_override must be None or a nonzero int"):
        F.avg_pool2d(numpy.zeros((1, 1, 8, 8)), 2, divisor_override=2.5)
    with pytest.raises(TypeError, match="count_include_pad must be a bool"):
        F.avg_pool2d(numpy.zeros((1, 1, 8, 8)), 2, count_include_pad=0)
    with pytest.raises(ValueError, match="input shape must be 4 positive ints"):
        F.avg_pool2d(numpy.zeros((1, 0, 8, 8)), 2)
