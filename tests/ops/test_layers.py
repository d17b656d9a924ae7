import numpy
import pytest

import gpucnn
from gpucnn import (AvgPool2D, Conv2D, Dropout, Flatten, Linear, MaxPool2D, ReLU, Residual,
                    Sequential)


def test_conv_init_follows_torch_rule():
    gpucnn.manual_seed(0)
    layer = Conv2D(6, 40, (5, 3), groups=2)
    bound = 1 / numpy.sqrt(3 * 5 * 3)  # fan_in = in_channels/groups * kH * kW
    w = layer.weight.data
    assert w.shape == (40, 3, 5, 3) and w.dtype == numpy.float32
    assert numpy.abs(w).max() <= bound and numpy.abs(w).max() > 0.98 * bound
    assert abs(w.std() - bound / numpy.sqrt(3)) < 0.05 * bound  # uniform's std
    assert numpy.abs(layer.bias.data).max() <= bound


def test_linear_init_and_bias_false():
    layer = Linear(50, 30, bias=False)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]
    assert numpy.abs(layer.weight.data).max() <= 1 / numpy.sqrt(50)


def test_seed_makes_init_repeatable():
    gpucnn.manual_seed(3)
    a = Conv2D(1, 4, 3).weight.data
    gpucnn.manual_seed(3)
    assert numpy.array_equal(a, Conv2D(1, 4, 3).weight.data)


def test_sequential_names_like_torch_and_state_round_trip():
    net = Sequential(Conv2D(1, 2, 3), ReLU(), Flatten(), Linear(8, 3))
    names = list(net.state_dict())
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias"]
    other = Sequential(Conv2D(1, 2, 3), ReLU(), Flatten(), Linear(8, 3))
    other.load_state_dict({k: v.copy() for k, v in net.state_dict().items()})
    for k, v in net.state_dict().items():
        assert numpy.array_equal(v, other.state_dict()[k])


def test_load_state_dict_checks_everything_first():
    net = Sequential(Conv2D(1, 2, 3), Linear(8, 3))
    before = {k: v.copy() for k, v in net.state_dict().items()}
    bad = dict(before)
    bad["0.weight"] = numpy.ones_like(before["0.weight"])
    bad["1.weight"] = numpy.ones((3, 9), numpy.float32)
    with pytest.raises(ValueError, match=r"state_dict\['1.weight'\] has shape \(3, 9\)"):
        net.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"missing keys \[.0.bias., .1.bias., .1.weight.\]"):
        net.load_state_dict({"0.weight": before["0.weight"]})
    for k, v in net.state_dict().items():  # nothing was half-loaded
        assert numpy.array_equal(v, before[k])


def test_forward_backward_accumulates_like_torch():
    net = Sequential(Conv2D(1, 2, 3), ReLU(), MaxPool2D(2), AvgPool2D(1), Flatten(), Linear(8, 3))
    x = numpy.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(numpy.float32)
    y = net(x)
    assert y.shape == (2, 3)
    net.backward(numpy.ones_like(y))
    g1 = net[0].weight.grad.copy()
    net.forward(x)
    net.backward(numpy.ones_like(y))
    numpy.testing.assert_allclose(net[0].weight.grad, 2 * g1, rtol=1e-6)
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_dtype_and_errors():
    net = Sequential(Linear(4, 2)).to(dtype=numpy.float64)
    assert net[0].weight.data.dtype == numpy.float64
    with pytest.raises(TypeError, match="weight has dtype float64 but input has dtype float32"):
        net(numpy.zeros((1, 4), numpy.float32))
    with pytest.raises(RuntimeError, match="Linear.backward called before forward"):
        Linear(4, 2).backward(numpy.zeros((1, 2)))
    with pytest.raises(TypeError, match="Sequential takes Modules"):
        Sequential(Linear(4, 2), "relu")
    with pytest.raises(ValueError, match="groups=2 must divide in_channels"):
        Conv2D(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="'same' needs stride 1"):
        Conv2D(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="p must be a probability"):
        Dropout(1.5)


def test_dropout_train_and_eval():
    gpucnn.manual_seed(0)
    layer = Dropout(0.25)
    x = numpy.ones((200, 50))
    y = layer(x)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    numpy.testing.assert_allclose(y[kept], 1 / 0.75)
    numpy.testing.assert_array_equal(layer.backward(numpy.ones_like(x)), y)
    layer.eval()
    assert layer(x) is x


def test_conv_keeps_its_padded_input_for_backward_only_in_training():
    """In training Conv2D keeps the padded copy of x its forward built, for
    backward-filter; in eval mode (inference) it keeps none, and a backward there
    still gives the same gradients."""
    rng = numpy.random.default_rng(0)
    x, dy = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((2, 4, 6, 6))
    conv = Conv2D(3, 4, 3, padding=1).to(dtype=numpy.float64)
    grads = []
    for training in (True, False):
        conv.train(training)
        conv.zero_grad()
        conv(x)
        assert (conv._ctx.source is not None) == training  # what the layer kept
        dx = conv.backward(dy)
        assert not hasattr(conv._ctx, "source")  # released by the backward
        grads.append((dx, conv.weight.grad.copy(), conv.bias.grad.copy()))
    for a, b in zip(*grads):
        numpy.testing.assert_array_equal(a, b)


def test_summary_names_each_layer_by_its_dotted_path_and_a_lone_layer_by_its_type():
    lines = []
    Linear(3, 2).summary((3,), print_fn=lines.append)
    assert [line.split()[:2] for line in lines[0].splitlines()[3:4]] == [["Linear", "(Linear)"]]
    net = Sequential(Residual(Sequential(Linear(3, 3), ReLU())), Flatten())
    lines = []
    net.summary((3,), print_fn=lines.append)
    names = [line.split()[:2] for line in lines[0].splitlines()[3:7]]
    assert names == [["0.body.0", "(Linear)"], ["0.body.1", "(ReLU)"],
                     ["0.shortcut", "(Identity)"], ["1", "(Flatten)"]]
