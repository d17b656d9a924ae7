"""Every layer and both optimizers on the CuPy stand-in (the GPU path, its
kernels emulated) against the same on the CPU; the results stay on the device
and nothing is read back on the way."""
import numpy
import pytest

import gpucnn
from conftest import close
from gpucnn import backend, functional as F

LAYERS = {
    "Conv2D": lambda: gpucnn.Conv2D(4, 6, 3, padding=1),
    "Conv2D stride 2 dilation 2 groups 2": lambda: gpucnn.Conv2D(4, 6, 3, stride=2, padding=2,
                                                                 dilation=2, groups=2),
    "Conv2D depthwise 'same' no bias": lambda: gpucnn.Conv2D(4, 8, (3, 2), padding="same",
                                                             groups=4, bias=False),
    "MaxPool2D": lambda: gpucnn.MaxPool2D(2),
    "MaxPool2D overlapping ceil": lambda: gpucnn.MaxPool2D(3, 2, 1, ceil_mode=True),
    "AvgPool2D": lambda: gpucnn.AvgPool2D(3, 2, 1, ceil_mode=True),
    "ReLU": gpucnn.ReLU,
    "Flatten": gpucnn.Flatten,
    "Linear after Flatten": lambda: gpucnn.Sequential(gpucnn.Flatten(),
                                                      gpucnn.Linear(4 * 7 * 6, 5)),
    "Sequential": lambda: gpucnn.Sequential(gpucnn.Conv2D(4, 8, 3), gpucnn.ReLU(),
                                            gpucnn.MaxPool2D(2), gpucnn.Flatten(),
                                            gpucnn.Linear(8 * 2 * 2, 3)),
}


def _run(make, device, dtype, x, seed=0):
    gpucnn.manual_seed(seed)
    layer = make().to(device, dtype=dtype)
    xd = backend.to_device(x.astype(dtype), device)
    y = layer(xd)
    dy = backend.to_device(numpy.random.default_rng(2).standard_normal(y.shape).astype(dtype),
                           device)
    dx = layer.backward(dy)
    grads = [p.grad for p in layer.parameters()]
    return [y, dx, *grads]


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_standin_layer_forward_backward(standin, name, dtype):
    x = numpy.random.default_rng(1).standard_normal((3, 4, 7, 6))
    cpu = _run(LAYERS[name], "cpu", numpy.float64, x)
    with standin.count_syncs() as syncs:
        got = _run(LAYERS[name], "cuda", dtype, x)
        assert syncs() == 0, f"{name} read a device value back"
    for a, ref in zip(got, cpu):
        assert isinstance(a, standin.ndarray) and a.dtype == dtype
        close(a, ref, dtype, scale=10)


def test_standin_dropout(standin):
    gpucnn.manual_seed(0)
    layer = gpucnn.Dropout(0.5).to("cuda")
    x = standin.ones((64, 64), dtype=numpy.float32)
    y = layer(x)
    dx = layer.backward(standin.ones_like(y))
    host = y.get()
    assert set(numpy.unique(host)) <= {0.0, 2.0} and 0.4 < (host == 0).mean() < 0.6
    assert numpy.array_equal(dx.get(), host)  # the same mask forward and backward
    assert layer.eval()(x) is x


def test_dropout_masks_are_the_cpus(standin):
    """The GPU draws the CPU's masks (one generator for both devices), so a model with
    Dropout trains alike on both and resumes on either."""
    gpucnn.manual_seed(0)
    on_cpu = gpucnn.Dropout(0.3)
    on_gpu = gpucnn.Dropout(0.3).to("cuda")
    on_gpu.set_rng_state(on_cpu.get_rng_state())
    x = numpy.random.default_rng(1).standard_normal((8, 50)).astype(numpy.float32)
    for _ in range(2):
        with standin.count_syncs() as syncs:
            y = on_gpu(standin.asarray(x))
        assert syncs() == 0
        assert numpy.array_equal(y.get(), on_cpu(x))


OPTIMIZERS = {
    "SGD": dict(cls=gpucnn.SGD, lr=0.1),
    "SGD momentum weight decay": dict(cls=gpucnn.SGD, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "SGD nesterov": dict(cls=gpucnn.SGD, lr=0.1, momentum=0.9, nesterov=True),
    "Adam": dict(cls=gpucnn.Adam, lr=1e-2),
    "Adam weight decay": dict(cls=gpucnn.Adam, lr=1e-2, weight_decay=1e-2),
}


def _optimise(device, spec):
    spec = dict(spec)
    cls = spec.pop("cls")
    gpucnn.manual_seed(0)
    net = gpucnn.Sequential(gpucnn.Flatten(), gpucnn.Linear(12, 5)).to(device, dtype=numpy.float64)
    opt = cls(net.parameters(), **spec)
    rng = numpy.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((4, 3, 2, 2)), device)
    y = backend.to_device(rng.integers(0, 5, 4), device)
    for _ in range(3):
        opt.zero_grad()
        loss, dz = F.softmax_cross_entropy(net(x), y, check_labels=False)
        net.backward(dz)
        opt.step()
    return net, opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_standin_optimizer(standin, name):
    cpu, _ = _optimise("cpu", OPTIMIZERS[name])
    with standin.count_syncs() as syncs:
        net, opt = _optimise("cuda", OPTIMIZERS[name])
        assert syncs() == 0
    for k, v in net.state_dict().items():
        assert isinstance(v, standin.ndarray)
        numpy.testing.assert_allclose(v.get(), cpu.state_dict()[k], rtol=1e-12, atol=1e-12)
    for state in opt.state:
        assert all(isinstance(v, standin.ndarray) for v in state.values() if hasattr(v, "shape"))


def test_standin_conv2d_backward_of_an_empty_batch(standin):
    x = standin.zeros((0, 2, 5, 5), dtype=numpy.float32)
    w = standin.ones((3, 2, 3, 3), dtype=numpy.float32)
    dy = standin.zeros((0, 3, 5, 5), dtype=numpy.float32)
    dx, dw, db = F.conv2d_backward(dy, x, w, padding=1)
    assert dx.shape == (0, 2, 5, 5) and not dw.get().any() and not db.get().any()
    assert dw.shape == (3, 2, 3, 3) and db.shape == (3,)


def test_standin_softmax_cross_entropy_label_check(standin):
    logits = standin.zeros((3, 4), dtype=numpy.float32)
    bad = standin.asarray(numpy.array([0, 4, 1]))
    with standin.count_syncs() as syncs:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
            F.softmax_cross_entropy(logits, bad)
        assert syncs() >= 1  # the check reads the device: which is why a step skips it
    with standin.count_syncs() as syncs:
        loss, dz = F.softmax_cross_entropy(logits, standin.asarray(numpy.array([0, 3, 1])),
                                           check_labels=False)
        assert syncs() == 0
    assert abs(float(loss) - numpy.log(4)) < 1e-6
