import numpy
import pytest

from gpucnn import functional as F
from gpucnn import gradcheck


def test_forward_backward_and_zero_rule():
    x = numpy.array([-1.0, 0.0, 2.0], dtype=numpy.float32)
    numpy.testing.assert_array_equal(F.relu(x), [0, 0, 2])
    dx = F.relu_backward(numpy.ones_like(x), x)
    numpy.testing.assert_array_equal(dx, [0, 0, 1])  # the gradient at exactly 0 is 0
    assert dx.dtype == numpy.float32


def test_matches_torch(torch, rng):
    x = rng.standard_normal((3, 4, 5))
    tx = torch.tensor(x, requires_grad=True)
    dy = rng.standard_normal(x.shape)
    torch.relu(tx).backward(torch.tensor(dy))
    numpy.testing.assert_array_equal(F.relu_backward(dy, x), tx.grad.numpy())


def test_finite_differences(rng):
    inputs, fwd, bwd = gradcheck.cases(rng)["relu"]
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


def test_bad_arguments():
    with pytest.raises(TypeError, match="int64"):
        F.relu(numpy.arange(3))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(3,\)"):
        F.relu_backward(numpy.zeros(2), numpy.zeros(3))
