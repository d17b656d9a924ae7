"""An empty batch (N = 0) goes through every op, layer and backward on the CPU and
gives empty outputs and zero parameter gradients, as in PyTorch. (The loss of an
empty batch stays an error: its mean is undefined.)"""
import numpy
import pytest

import gpucnn
from gpucnn import functional as F

from conftest import close


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request, cpu_threads):
    """gpucnn's CPU passes on one thread and on two: they take different paths."""
    cpu_threads(request.param)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_every_op_and_backward_on_an_empty_batch(dtype, torch, threads):
    rng = numpy.random.default_rng(0)
    x = numpy.zeros((0, 4, 9, 7), dtype)
    w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    kw = dict(stride=2, padding=1, dilation=1, groups=2)
    y = F.conv2d(x, w, numpy.zeros(6, dtype), **kw)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), **kw)
    assert y.shape == tuple(ref.shape) == (0, 6, 5, 4) and y.dtype == dtype
    for need in (True, False):
        dx, dw, db = F.conv2d_backward(numpy.zeros(y.shape, dtype), x, w, **kw,
                                       need_input_grad=need)
        assert (dx is None) != need and (dx is None or dx.shape == x.shape)
        assert dw.shape == w.shape and not dw.any() and db.shape == (6,) and not db.any()
        assert dw.dtype == dtype
    for pool in ("max", "avg"):
        args = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        if pool == "max":
            y, idx = F.max_pool2d(x, **args)
            for with_geometry in (args, {}):
                dx = F.max_pool2d_backward(numpy.zeros(y.shape, dtype), idx, x.shape,
                                           **with_geometry)
                assert dx.shape == x.shape and dx.dtype == dtype
        else:
            y = F.avg_pool2d(x, **args)
            dx = F.avg_pool2d_backward(numpy.zeros(y.shape, dtype), x.shape, **args)
            assert dx.shape == x.shape
        assert y.shape == (0, 4, 5, 4)
    assert F.relu_backward(F.relu(x), x).shape == x.shape
    lin_x, lin_w = numpy.zeros((0, 5), dtype), numpy.ones((3, 5), dtype)
    assert F.linear(lin_x, lin_w, numpy.ones(3, dtype)).shape == (0, 3)
    dx, dw, db = F.linear_backward(numpy.zeros((0, 3), dtype), lin_x, lin_w)
    assert dx.shape == (0, 5) and dw.shape == (3, 5) and not dw.any() and not db.any()
    with pytest.raises(ValueError, match="at least one sample"):
        F.softmax_cross_entropy(numpy.zeros((0, 3), dtype), numpy.zeros(0, numpy.int64))


def test_a_network_trains_on_an_empty_batch_without_changing(threads):
    gpucnn.manual_seed(0)
    net = gpucnn.Sequential(gpucnn.Conv2D(1, 4, 3, padding=1), gpucnn.ReLU(),
                            gpucnn.MaxPool2D(2), gpucnn.AvgPool2D(2), gpucnn.Dropout(0.5),
                            gpucnn.Flatten(), gpucnn.Linear(4 * 2 * 2, 3))
    before = {k: v.copy() for k, v in net.state_dict().items()}
    opt = gpucnn.SGD(net.parameters(), lr=0.1)
    y = net(numpy.zeros((0, 1, 8, 8), numpy.float32))
    assert y.shape == (0, 3)
    dx = net.backward(numpy.zeros((0, 3), numpy.float32))
    assert dx.shape == (0, 1, 8, 8)
    for p in net.parameters():
        assert p.grad.shape == p.data.shape and not p.grad.any()
    opt.step()
    for k, v in net.state_dict().items():
        assert numpy.array_equal(v, before[k])
    net.eval()
    assert net(numpy.zeros((0, 1, 8, 8), numpy.float32)).shape == (0, 3)


def test_flatten_of_an_empty_batch_keeps_its_features():
    f = gpucnn.Flatten()
    assert f(numpy.zeros((0, 2, 3, 4), numpy.float32)).shape == (0, 24)
    close(f.backward(numpy.zeros((0, 24), numpy.float32)), numpy.zeros((0, 2, 3, 4)),
          numpy.float32)
