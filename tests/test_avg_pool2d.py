import numpy
import pytest

from conftest import close
from gpucnn import functional as F
from gpucnn import gradcheck
from test_max_pool2d import GRID


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("xs, kw", GRID)
def test_matches_torch(torch, rng, xs, kw, dtype):
    x = rng.standard_normal(xs)
    y = F.avg_pool2d(x.astype(dtype), **kw)
    dy = rng.standard_normal(y.shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(tx, **kw)
    ty.backward(torch.tensor(dy))
    dx = F.avg_pool2d_backward(dy.astype(dtype), x.shape, **kw)
    assert y.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
    close(y, ty.detach().numpy(), dtype)
    close(dx, tx.grad.numpy(), dtype)


def test_gradient_is_shared_equally():
    dx = F.avg_pool2d_backward(numpy.array([[[[4.0]]]]), (1, 1, 2, 2), kernel_size=2)
    numpy.testing.assert_array_equal(dx, numpy.ones((1, 1, 2, 2)))


@pytest.mark.parametrize("name", ["avg_pool2d 2x2", "avg_pool2d 3x2 s2 p1 ceil"])
def test_finite_differences(name, rng):
    inputs, fwd, bwd = gradcheck.cases(rng)[name]
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


def test_bad_arguments():
    with pytest.raises(ValueError, match="at most half of kernel_size"):
        F.avg_pool2d(numpy.zeros((1, 1, 8, 8)), 3, padding=2)
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        F.avg_pool2d(numpy.zeros((1, 1, 8, 8), dtype=numpy.int32), 2)
    with pytest.raises(ValueError, match="input_shape must be 4 positive ints"):
        F.avg_pool2d_backward(numpy.zeros((1, 1, 4, 4)), (1, 8, 8), 2)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(1, 1, 4, 4\)"):
        F.avg_pool2d_backward(numpy.zeros((1, 1, 3, 4)), (1, 1, 8, 8), 2)
