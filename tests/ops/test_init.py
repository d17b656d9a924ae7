"""Kaiming-normal initialisation (fan_out, ReLU gain), selectable per layer."""
import math

import numpy
import pytest

import gpucnn
from gpucnn import init
from gpucnn.nn import Conv2D, Linear


def test_conv_kaiming_normal_has_torchvisions_std():
    gpucnn.manual_seed(0)
    conv = Conv2D(8, 64, 3, init="kaiming_normal")
    w = conv.weight.data
    assert w.dtype == numpy.float32 and w.shape == (64, 8, 3, 3)
    std = math.sqrt(2 / (64 * 9))  # torch.nn.init.kaiming_normal_(mode='fan_out', 'relu')
    assert abs(w.mean()) < 3 * std / math.sqrt(w.size)
    assert abs(w.std() / std - 1) < 0.05
    # the bias keeps PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert numpy.abs(conv.bias.data).max() <= 1 / math.sqrt(8 * 9)


def test_default_is_unchanged_and_seeded():
    gpucnn.manual_seed(5)
    a = Conv2D(3, 4, 3).weight.data
    gpucnn.manual_seed(5)
    b = Conv2D(3, 4, 3, init="default").weight.data
    assert numpy.array_equal(a, b) and numpy.abs(a).max() <= 1 / math.sqrt(27)
    gpucnn.manual_seed(5)
    c = Linear(100, 50, init="kaiming_normal").weight.data
    assert abs(c.std() / math.sqrt(2 / 50) - 1) < 0.05


def test_function_form_and_errors():
    gpucnn.manual_seed(0)
    conv = Conv2D(16, 32, 3).to(dtype="float64")
    init.kaiming_normal_(conv.weight, mode="fan_in")
    assert conv.weight.data.dtype == numpy.float64
    assert abs(conv.weight.data.std() / math.sqrt(2 / (16 * 9)) - 1) < 0.05
    assert init.fans((32, 16, 3, 3)) == (144, 288)
    with pytest.raises(ValueError, match="init must be one of"):
        Conv2D(1, 1, 1, init="xavier")
    with pytest.raises(ValueError, match=r"mode must be one of \('fan_in', 'fan_out'\), got 'fan'"):
        init.kaiming_normal_(conv.weight, mode="fan")
