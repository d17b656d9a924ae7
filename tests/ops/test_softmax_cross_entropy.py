import numpy
import pytest

from conftest import close
from gpucnn import functional as F
from gpucnn.tools import gradcheck


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_matches_torch(torch, rng, dtype):
    z, y = rng.standard_normal((6, 10)) * 4, rng.integers(0, 10, 6)
    tz = torch.tensor(z, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tz, torch.tensor(y))
    tl.backward()
    loss, dz = F.softmax_cross_entropy(z.astype(dtype), y)
    assert dz.dtype == dtype
    close(loss, tl.item(), dtype)
    close(dz, tz.grad.numpy(), dtype)


def test_stable_for_huge_logits():
    z = numpy.array([[1e30, -1e30, 0.0], [-1e4, 1e4, 1e4]])
    loss, dz = F.softmax_cross_entropy(z, numpy.array([0, 1]))
    assert numpy.isfinite(loss) and numpy.isfinite(dz).all()
    numpy.testing.assert_allclose(loss, numpy.log(2) / 2)
    numpy.testing.assert_allclose(dz, [[0, 0, 0], [0, -0.25, 0.25]], atol=1e-15)


def test_finite_differences(rng):
    inputs, fwd, bwd = gradcheck.cases(rng)["softmax_cross_entropy"]
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


def test_bad_labels():
    z = numpy.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\] .* from -1 to 4"):
        F.softmax_cross_entropy(z, numpy.array([0, -1, 4]))
    with pytest.raises(TypeError, match="labels must be an integer array, got float64"):
        F.softmax_cross_entropy(z, numpy.zeros(3))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        F.softmax_cross_entropy(z, numpy.zeros(2, dtype=int))


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5, 1.0])
def test_label_smoothing_matches_torch(torch, rng, dtype, smoothing):
    z, y = rng.standard_normal((7, 5)) * 3, rng.integers(0, 5, 7)
    tz = torch.tensor(z, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tz, torch.tensor(y), label_smoothing=smoothing)
    tl.backward()
    loss, dz = F.softmax_cross_entropy(z.astype(dtype), y, label_smoothing=smoothing)
    assert dz.dtype == dtype
    close(loss, tl.item(), dtype)
    close(dz, tz.grad.numpy(), dtype)


def test_label_smoothing_finite_differences(rng):
    y = numpy.array([2, 0, 1])
    inputs = dict(logits=rng.standard_normal((3, 4)) * 2)
    fwd = lambda logits: F.softmax_cross_entropy(logits, y, 0.2)[0]  # noqa: E731
    bwd = lambda G, logits: dict(logits=F.softmax_cross_entropy(logits, y, 0.2)[1] * G)  # noqa
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


def test_label_smoothing_range():
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing must be a number in"):
            F.softmax_cross_entropy(numpy.zeros((2, 3)), numpy.zeros(2, int), bad)
