import numpy
import pytest

from conftest import close
from gpucnn import functional as F
from gpucnn.tools import gradcheck
from gpucnn.nn import GlobalAvgPool2D


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 1), (3, 2, 7, 7)])
def test_matches_torch(torch, rng, dtype, shape):
    x = rng.standard_normal(shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.adaptive_avg_pool2d(tx, 1).flatten(1)
    dy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(dy))
    layer = GlobalAvgPool2D()
    y = layer(x.astype(dtype))
    dx = layer.backward(dy.astype(dtype))
    assert y.dtype == dx.dtype == dtype and dx.shape == shape
    close(y, ty.detach().numpy(), dtype)
    close(dx, tx.grad.numpy(), dtype)


def test_finite_differences(rng):
    inputs = dict(x=rng.standard_normal((2, 3, 4, 3)))
    assert gradcheck.check(inputs, F.global_avg_pool2d,
                           lambda G, x: dict(x=F.global_avg_pool2d_backward(G, x.shape)),
                           rng) < gradcheck.TOLERANCE


def test_errors():
    with pytest.raises(ValueError, match=r"input must be 4-D, got shape \(2, 3\)"):
        F.global_avg_pool2d(numpy.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 3\)"):
        F.global_avg_pool2d_backward(numpy.zeros((2, 4)), (2, 3, 4, 4))


def test_empty_batch():
    layer = GlobalAvgPool2D()
    assert layer(numpy.zeros((0, 3, 4, 4), numpy.float32)).shape == (0, 3)
    assert layer.backward(numpy.zeros((0, 3), numpy.float32)).shape == (0, 3, 4, 4)
