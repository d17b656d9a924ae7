"""Module and Sequential edges: NumPy integers as sizes, load_state_dict's checks,
a second backward for one forward, and a Sequential naming its failing layer."""
import numpy
import pytest

import gpucnn
from gpucnn import Conv2D, Dropout, Flatten, Linear, MaxPool2D, ReLU, Sequential


def test_layer_sizes_accept_numpy_integers():
    conv = Conv2D(numpy.int64(3), numpy.int32(6), numpy.int64(3), groups=numpy.int64(3))
    assert conv.weight.shape == (6, 1, 3, 3) and type(conv.in_channels) is int
    lin = Linear(numpy.int64(4), numpy.uint8(2))
    assert lin.weight.shape == (2, 4) and type(lin.out_features) is int
    assert Dropout(numpy.float32(0.25)).p == 0.25
    with pytest.raises(TypeError, match="in_features must be a positive int, got float 2.5"):
        Linear(2.5, 3)
    with pytest.raises(ValueError, match="out_channels must be a positive int, got 0"):
        Conv2D(1, numpy.int64(0), 3)


def _net():
    gpucnn.manual_seed(0)
    return Sequential(Conv2D(1, 2, 3), ReLU(), Flatten(), Linear(8, 3))


def test_load_state_dict_names_the_key_and_changes_nothing_on_error():
    net = _net()
    good = {k: v.copy() for k, v in net.state_dict().items()}
    other = {k: numpy.full_like(v, 7.0) for k, v in good.items()}  # valid, but must not land
    cases = [
        ({k: v for k, v in other.items() if k != "3.bias"}, ValueError,
         r"missing keys \['3.bias'\], unexpected keys \[\]"),
        (dict(other, extra=numpy.zeros(1)), ValueError, r"unexpected keys \['extra'\]"),
        (dict(other, **{"3.weight": [[0.0] * 8] * 3}), TypeError,
         r"state_dict\['3.weight'\] must be an array, got list"),
        (dict(other, **{"0.bias": numpy.array(["a", "b"])}), TypeError,
         r"state_dict\['0.bias'\] must hold numbers, got dtype <U1"),
        (dict(other, **{"0.weight": numpy.zeros((2, 1, 3, 4), numpy.float32)}), ValueError,
         r"state_dict\['0.weight'\] has shape \(2, 1, 3, 4\), the model needs \(2, 1, 3, 3\)"),
        (dict(other, **{"3.bias": numpy.array([1.0, numpy.inf, 0], numpy.float32)}), ValueError,
         r"state_dict\['3.bias'\] holds NaN or infinite values; pass allow_nonfinite=True"),
        (list(other.items()), TypeError, "state_dict must be a mapping"),
    ]
    for state, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            net.load_state_dict(state)
        for k, v in net.state_dict().items():  # nothing half-loaded
            assert numpy.array_equal(v, good[k]), k
    nan = dict(good, **{"3.bias": numpy.array([numpy.nan, 0, 0], numpy.float32)})
    net.load_state_dict(nan, allow_nonfinite=True)
    assert numpy.isnan(net[3].bias.data[0])


def test_a_second_backward_for_one_forward_is_an_error():
    net = _net()
    x = numpy.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(numpy.float32)
    dy = numpy.ones((2, 3), numpy.float32)
    net(x)
    net.backward(dy)
    grads = [p.grad.copy() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"Linear.backward called a second time for one "
                                           r"forward; run forward again"):
        net.backward(dy)
    for g, p in zip(grads, net.parameters()):
        assert numpy.array_equal(g, p.grad)  # not doubled
    for layer in (Conv2D(1, 2, 3), MaxPool2D(2), ReLU(), Flatten(), Dropout(0.3)):
        y = layer(x)
        layer.backward(numpy.ones_like(y))
        with pytest.raises(RuntimeError, match="called a second time"):
            layer.backward(numpy.ones_like(y))
    net(x)  # a new forward allows a new backward (gradients accumulate, as in PyTorch)
    net.backward(dy)
    assert numpy.allclose(net[3].weight.grad, 2 * grads[-2])


def test_a_sequential_names_the_layer_whose_shapes_do_not_chain():
    net = Sequential(Conv2D(1, 2, 3), ReLU(), MaxPool2D(2), Flatten(), Linear(10, 3))
    x = numpy.zeros((2, 1, 6, 6), numpy.float32)
    with pytest.raises(ValueError, match=r"^layer 4 \(Linear\), input of shape \(2, 8\): "
                                         r"input has 8 features"):
        net(x)
    outer = Sequential(Sequential(Flatten(), Linear(36, 4)), Linear(5, 2))
    with pytest.raises(ValueError, match=r"^layer 1 \(Linear\), input of shape \(2, 4\)"):
        outer(x)
    inner = Sequential(ReLU(), Sequential(Flatten(), Linear(7, 4)))
    with pytest.raises(ValueError, match=r"^layer 1.1 \(Linear\), input of shape \(2, 36\): "
                                         r"input has 36 features"):
        inner(x)
    good = Sequential(Flatten(), Linear(36, 3))
    good(x)
    with pytest.raises(ValueError, match=r"^layer 1 \(Linear\), gradient of shape \(2, 4\): "
                                         r"grad_output must have shape \(2, 3\)"):
        good.backward(numpy.zeros((2, 4), numpy.float32))
