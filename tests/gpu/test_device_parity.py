"""Every functional op and a whole training step on a GPU device against the CPU
(float64 NumPy for the ops, the CPU run for the step), and the device against
itself for bitwise determinism. The GPU is CuPy's where there is one (skipped
elsewhere), and always the CuPy stand-in (tests/standin) with its kernels
served by the emulator."""
import functools

import numpy
import pytest

import gpucnn
from conftest import CUDA_SKIP, close
from gpucnn import backend, functional as F
from gpucnn.app import models
from gpucnn.step import train_step

OPS = {
    "conv2d": lambda x: F.conv2d(x, x[:5, :, :3, :3] * 0.5, None, stride=2, padding=1, groups=1),
    "conv2d_backward": lambda x: F.conv2d_backward(
        x[:, :6, :3, :3], x[:, :4], x[:6, :2, :3, :3], stride=2, padding=1, dilation=2, groups=2),
    "max_pool2d": lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    "max_pool2d_backward": lambda x: F.max_pool2d_backward(
        x[:, :, :4, :4], F.max_pool2d(x, 3, 2, 1, ceil_mode=True)[1], x.shape, 3, 2, 1,
        ceil_mode=True),
    "max_pool2d dilation": lambda x: F.max_pool2d(x, (3, 2), 1, 1, dilation=(2, 3),
                                                  ceil_mode=True),
    "max_pool2d_backward dilation": lambda x: F.max_pool2d_backward(
        x[:, :, :5, :6], F.max_pool2d(x, (3, 2), 1, 1, (2, 3), True)[1], x.shape, (3, 2), 1, 1,
        (2, 3), True),
    "avg_pool2d": lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True),
    "avg_pool2d_backward": lambda x: F.avg_pool2d_backward(x[:, :, :4, :4], x.shape, 3, 2, 1,
                                                           True),
    "avg_pool2d count_include_pad=False": lambda x: F.avg_pool2d(
        x, (3, 2), 2, 1, ceil_mode=True, count_include_pad=False),
    "avg_pool2d_backward count_include_pad=False": lambda x: F.avg_pool2d_backward(
        x[:, :, :4, :4], x.shape, (3, 2), 2, 1, True, count_include_pad=False),
    "avg_pool2d divisor_override": lambda x: F.avg_pool2d(x, 3, 1, 1, divisor_override=4),
    "avg_pool2d_backward divisor_override": lambda x: F.avg_pool2d_backward(
        x[:, :, :7, :7], x.shape, 3, 1, 1, divisor_override=4),
    "relu": F.relu,
    "relu_backward": lambda x: F.relu_backward(x[::-1], x),
    "linear": lambda x: F.linear(x.reshape(8, -1), x.reshape(8, -1)[:3]),
    "linear_backward": lambda x: F.linear_backward(x.reshape(8, -1)[:, :3], x.reshape(8, -1),
                                                   x.reshape(8, -1)[:3]),
    "softmax_cross_entropy": lambda x: F.softmax_cross_entropy(
        x.reshape(8, -1), backend.get_array_module(x).arange(8) % 5),
    "softmax_cross_entropy label_smoothing": lambda x: F.softmax_cross_entropy(
        x.reshape(8, -1), backend.get_array_module(x).arange(8) % 5, label_smoothing=0.1),
    "batch_norm train": lambda x: _bn(x, True),
    "batch_norm eval": lambda x: _bn(x, False),
    "batch_norm_backward train": lambda x: F.batch_norm_backward(x[::-1], _bn(x, True)[1],
                                                                 x[0, :, 0, 0] + 2),
    "batch_norm_backward eval": lambda x: F.batch_norm_backward(x[::-1], _bn(x, False)[1],
                                                                x[0, :, 0, 0] + 2),
    "global_avg_pool2d": F.global_avg_pool2d,
    "global_avg_pool2d_backward": lambda x: F.global_avg_pool2d_backward(x[:, :, 0, 0] * 1,
                                                                         x.shape),
}


def _bn(x, training):
    """batch_norm with running statistics (updated in training) derived from x; returns
    (y, saved, running_mean, running_var) so the updated statistics are compared too."""
    xp = backend.get_array_module(x)
    rm, rv = x[1, :, 1, 1] * 1, xp.abs(x[2, :, 2, 2]) + 0.5
    y, saved = F.batch_norm(x, rm, rv, x[0, :, 0, 0] + 2, x[0, :, 1, 0], training=training,
                            momentum=0.2)
    return y, saved, rm, rv


def _flat(result):
    if not isinstance(result, tuple):
        return [result]
    out = []
    for r in result:  # nested tuples (batch_norm's saved state); skip flags and Nones
        if isinstance(r, tuple):
            out += _flat(r)
        elif hasattr(r, "dtype"):
            out.append(r)
    return out


@pytest.fixture(params=["cuda-standin", pytest.param("cuda", marks=CUDA_SKIP)])
def gpu(request):
    """'cuda', played by the stand-in or by CuPy on a real GPU."""
    if request.param == "cuda-standin":
        standin = request.getfixturevalue("standin")
        # each kernel launch in a shuffled thread order, checked bitwise against another
        with standin.emulator_order(2, 1):
            yield "cuda"
        return
    yield "cuda"


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("op", sorted(OPS))
def test_op_matches_cpu_float64(gpu, op, dtype):
    device = gpu
    x = numpy.random.default_rng(5).standard_normal((8, 6, 7, 7))
    reference = _flat(OPS[op](x))
    xd = backend.to_device(x.astype(dtype), device)
    got, again = _flat(OPS[op](xd)), _flat(OPS[op](xd))
    for a, b, ref in zip(got, again, reference):
        assert backend.device_of(a) == device
        assert numpy.array_equal(backend.to_numpy(a), backend.to_numpy(b))
        if ref.dtype.kind == "f":
            assert a.dtype == dtype
        close(a, ref, dtype, scale=10)


def _train(device):
    """Two SGD steps of the digits net; (weights on the host, the device they were on)."""
    gpucnn.manual_seed(0)
    net = models.digits_net().to(device)
    opt = gpucnn.SGD(net.parameters(), lr=0.05, momentum=0.9)
    rng = numpy.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((6, 1, 8, 8)).astype(numpy.float32), device)
    y = backend.to_device(rng.integers(0, 10, 6), device)
    for _ in range(2):
        train_step(net, opt, x, y)
    return {k: backend.to_numpy(v) for k, v in net.state_dict().items()}, net.device


def test_training_step(gpu):
    (first, on), (second, _), (cpu, on_cpu) = _train(gpu), _train(gpu), _train("cpu")
    assert (on, on_cpu) == ("cuda", "cpu")  # two devices compared, not one with itself
    for k in first:
        assert numpy.array_equal(first[k], second[k]), f"{k} differs between two runs on {gpu}"
        numpy.testing.assert_allclose(first[k], cpu[k], rtol=1e-4, atol=1e-5)


def _train_resnet(device):
    gpucnn.manual_seed(0)
    net = models.resnet().to(device)
    opt = gpucnn.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    aug = gpucnn.Augment(padding=2, flip=True, seed=3)
    rng = numpy.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((4, 1, 28, 28)).astype(numpy.float32), device)
    y = backend.to_device(rng.integers(0, 10, 4), device)
    for _ in range(2):
        opt.zero_grad()
        loss, dz = F.softmax_cross_entropy(net(aug(x)), y, label_smoothing=0.1)
        net.backward(dz, need_input_grad=False)
        opt.step()
    return {k: backend.to_numpy(v) for k, v in net.state_dict().items()}


def test_resnet_training_step(gpu):
    first, second, cpu = _train_resnet(gpu), _train_resnet(gpu), _train_resnet("cpu")
    assert "3.0.body.1.running_var" in first
    for k in first:
        assert numpy.array_equal(first[k], second[k]), f"{k} differs between two runs on {gpu}"
        numpy.testing.assert_allclose(first[k], cpu[k], rtol=1e-4, atol=1e-5)


# The tensor-core precisions (docs/precision.md) against the CPU, each with its own
# tolerance. tf32: every output within 2^-10 of its sum of |products| (ten mantissa
# bits; the derivation's bound with room for FP32's accumulation); 3xtf32: FP32's.
CONV_OPS = {"conv2d": 1, "conv2d_backward": 2}  # op: its leading outputs the conv kernels make


@pytest.mark.parametrize("precision", ["tf32", "3xtf32"])
@pytest.mark.parametrize("op", sorted(CONV_OPS))
def test_conv_precision_matches_cpu_float64(gpu, op, precision):
    x = numpy.random.default_rng(5).standard_normal((8, 6, 7, 7))
    reference, absolute = _flat(OPS[op](x)), _flat(OPS[op](abs(x)))
    xd = backend.to_device(x.astype(numpy.float32), gpu)
    with gpucnn.conv_precision(precision):
        got, again = _flat(OPS[op](xd)), _flat(OPS[op](xd))
    for i, (a, b, ref, scale) in enumerate(zip(got, again, reference, absolute)):
        assert numpy.array_equal(backend.to_numpy(a), backend.to_numpy(b))
        error = abs(backend.to_numpy(a).astype(numpy.float64) - ref)
        if i >= CONV_OPS[op]:  # the bias gradient: a sum, no products, no tensor cores
            close(a, ref, numpy.float32, scale=10)
        elif precision == "tf32":
            assert (error <= 2.0 ** -10 * scale + 1e-6).all(), error.max()
            assert error.max() > 2.0 ** -16 * scale.max()  # not FP32 in disguise
        else:
            close(a, ref, numpy.float32, scale=10)


@functools.lru_cache(maxsize=None)  # each run once per session (xp: the stand-in or CuPy)
def _train_at(device, precision, model, xp):
    """Three SGD steps of a built-in model at a conv precision: (initial state, final
    state) on the host."""
    gpucnn.manual_seed(0)
    net = models.MODELS[model].build(num_classes=10, in_channels=1).to(device)
    initial = {k: backend.to_numpy(v) for k, v in net.state_dict().items()}
    opt = gpucnn.SGD(net.parameters(), lr=0.05, momentum=0.9)
    rng = numpy.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((4, 1, 28, 28)).astype(numpy.float32), device)
    y = backend.to_device(rng.integers(0, 10, 4), device)
    with gpucnn.conv_precision(precision):
        for _ in range(3):
            train_step(net, opt, x, y)
    return initial, {k: backend.to_numpy(v) for k, v in net.state_dict().items()}


# How far a run at another precision may end from the FP32 run, as a share of how far
# training moved each tensor (||w_p - w_fp32|| / ||w_fp32 - w_0||). tf32 rounds every
# conv operand to 2^-11 and a batch-4 BatchNorm amplifies it: measured up to 7% on the
# ResNet's first layer, 2% on LeNet's. 3xtf32: measured under 1e-5.
PRECISION_SHARE = {"tf32": 0.15, "3xtf32": 1e-4}


@pytest.mark.parametrize("precision", ["tf32", "3xtf32"])
@pytest.mark.parametrize("model", ["lenet", "resnet"])
def test_training_at_each_precision_matches_fp32(gpu, model, precision):
    xp = backend.xp_for(gpu)
    start, fp32 = _train_at(gpu, "fp32", model, xp)
    _, got = _train_at(gpu, precision, model, xp)
    assert got.keys() == fp32.keys()
    for k in got:
        if got[k].dtype.kind != "f":
            assert numpy.array_equal(got[k], fp32[k]), k
            continue
        moved = numpy.linalg.norm(fp32[k] - start[k])
        assert numpy.linalg.norm(got[k] - fp32[k]) <= PRECISION_SHARE[precision] * moved, k
    assert any(not numpy.array_equal(got[k], fp32[k]) for k in got)  # another arithmetic ran
