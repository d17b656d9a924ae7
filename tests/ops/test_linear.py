import numpy
import pytest

from conftest import close
from gpucnn import functional as F
from gpucnn.tools import gradcheck


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_matches_torch(torch, rng, dtype):
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((3, 7)), rng.standard_normal(3)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.linear(tx, tw, tb)
    dy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(dy))
    y = F.linear(x.astype(dtype), w.astype(dtype), b.astype(dtype))
    dx, dw, db = F.linear_backward(dy.astype(dtype), x.astype(dtype), w.astype(dtype))
    for got, want in ((y, ty.detach()), (dx, tx.grad), (dw, tw.grad), (db, tb.grad)):
        assert got.dtype == dtype
        close(got, want.numpy(), dtype)


def test_finite_differences(rng):
    inputs, fwd, bwd = gradcheck.cases(rng)["linear"]
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"input has 6 features .* expects in_features=7"):
        F.linear(numpy.zeros((2, 6)), numpy.zeros((3, 7)))
    with pytest.raises(ValueError, match="input must be 2-D"):
        F.linear(numpy.zeros((2, 6, 1)), numpy.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        F.linear(numpy.zeros((2, 7)), numpy.zeros((3, 7)), numpy.zeros(4))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 3\)"):
        F.linear_backward(numpy.zeros((3, 3)), numpy.zeros((2, 7)), numpy.zeros((3, 7)))
