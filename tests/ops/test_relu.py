import numpy
import pytest

from gpucnn import functional as F
from gpucnn.tools import gradcheck


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


def test_forward_in_every_layout(torch, rng):
    # contiguous samples go a sample at a time against a row of zeros, others against
    # a scalar 0: the bits of max(x, 0) either way (torch.relu's values; it keeps -0.0
    # where max gives +0.0, which assert_array_equal counts as equal)
    x = rng.standard_normal((4, 3, 5, 6)).astype(numpy.float32)
    x.flat[:7] = [numpy.nan, -numpy.inf, numpy.inf, -0.0, 0.0, 1e-45, -1e-45]
    for v in (x, x[::2], x[:, 1:], x.transpose(0, 2, 3, 1), x.reshape(4, -1), x[0, 0, 0]):
        y = F.relu(v)
        assert y.shape == v.shape and y.dtype == v.dtype
        assert y.tobytes() == numpy.maximum(v, numpy.float32(0)).tobytes()
        numpy.testing.assert_array_equal(y, torch.relu(torch.from_numpy(v.copy())).numpy())


def test_finite_differences(rng):
    inputs, fwd, bwd = gradcheck.cases(rng)["relu"]
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


def test_bad_arguments():
    with pytest.raises(TypeError, match="int64"):
        F.relu(numpy.arange(3))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(3,\)"):
        F.relu_backward(numpy.zeros(2), numpy.zeros(3))
