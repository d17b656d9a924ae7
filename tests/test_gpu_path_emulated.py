"""The GPU path's glue, without a GPU: the functional ops and a LeNet training
step with every CUDA kernel call served by the emulated kernels (the same .cu
sources and launchers), against the NumPy path."""
import numpy
import pytest

import gpucnn
import emulator
from gpucnn import cuda, functional as F, models
from test_device_parity import OPS, _flat



class _CountingKernels(cuda.Kernels):
    """Emulated kernels that remember which kernels were launched."""

    launched = set()

    def _function(self, filename, kernel, dtype, config="default"):
        self.launched.add(kernel)
        return super()._function(filename, kernel, dtype, config)


_EMULATED = emulator.kernels(order=2, compare_order=1, cls=_CountingKernels)


def _kernels_on_cpu(monkeypatch):
    """Route every kernel call to the emulator: numpy arrays take the GPU branches."""
    monkeypatch.setattr(cuda, "kernels_for", lambda xp: _EMULATED)


@pytest.mark.parametrize("op", sorted(OPS))
def test_functional_ops(op, monkeypatch):
    x = numpy.random.default_rng(5).standard_normal((8, 6, 7, 7))
    expected = _flat(OPS[op](x))
    _kernels_on_cpu(monkeypatch)
    for a, b in zip(_flat(OPS[op](x)), expected):
        numpy.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def _train(dtype):
    gpucnn.manual_seed(0)
    net = models.lenet().to(dtype=dtype)
    opt = gpucnn.SGD(net.parameters(), lr=0.05, momentum=0.9)
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((3, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, 3)
    for _ in range(2):
        opt.zero_grad()
        loss, dz = F.softmax_cross_entropy(net(x), y)
        net.backward(dz)
        opt.step()
    return net.state_dict()


@pytest.mark.parametrize("dtype, tol", [(numpy.float64, 1e-10), (numpy.float32, 1e-4)])
def test_lenet_training_step(dtype, tol, monkeypatch):
    expected = _train(dtype)
    _kernels_on_cpu(monkeypatch)
    _EMULATED.launched.clear()
    got = _train(dtype)
    assert _EMULATED.launched >= {"conv2d_forward", "conv2d_backward_data",
                                  "conv2d_backward_filter", "conv2d_sum_slices",
                                  "conv2d_backward_bias", "max_pool2d_forward",
                                  "max_pool2d_backward"}
    for k in expected:
        numpy.testing.assert_allclose(got[k], expected[k], rtol=tol, atol=tol)
