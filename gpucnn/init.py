"""Weight initialisation schemes beyond PyTorch's default (which the layers use unless told).

kaiming_normal_: w ~ N(0, std^2), std = gain / sqrt(fan), gain = sqrt(2) for ReLU;
fan = out_channels * kH * kW (mode 'fan_out', torchvision's ResNet) or
in_channels/groups * kH * kW ('fan_in'). torch.nn.init.kaiming_normal_'s formula,
drawn from gpucnn's seeded host generator.
"""
import math

from . import backend, random, validate

GAINS = {"relu": math.sqrt(2.0), "linear": 1.0}
INITS = ("default", "kaiming_normal")


def fans(shape):
    """(fan_in, fan_out) of a weight (out, in[, kH, kW]), PyTorch's rule."""
    if len(shape) < 2:
        raise ValueError(f"fan in/out needs a weight with at least 2 dims, got shape {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def kaiming_normal_(param, mode="fan_out", nonlinearity="relu"):
    """Redraw param.data (a Parameter) in place, keeping its device and dtype; returns it."""
    validate.choice(mode, "mode", ("fan_in", "fan_out"))
    validate.choice(nonlinearity, "nonlinearity", tuple(GAINS))
    shape = tuple(param.data.shape)
    fan_in, fan_out = fans(shape)
    std = GAINS[nonlinearity] / math.sqrt(fan_in if mode == "fan_in" else fan_out)
    values = random.normal(shape, std).astype(param.data.dtype)
    param.data = backend.to_device(values, backend.device_of(param.data))
    return param


def layer_parameters(shape, bias=True, init="default"):
    """(weight, bias or None) for a Conv2D or Linear weight of `shape` (out, in[, kH,
    kW]), drawn from gpucnn's seeded host generator in this order: PyTorch's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both, or with init='kaiming_normal' the
    weight from N(0, 2/fan_out) (torchvision's ResNet; the bias keeps the default)."""
    check_init(init)
    fan_in, fan_out = fans(shape)
    bound = 1 / math.sqrt(fan_in)
    weight = (random.uniform(shape, bound) if init == "default" else
              random.normal(shape, math.sqrt(2 / fan_out)))
    return weight, random.uniform((shape[0],), bound) if bias else None


def check_init(init):
    """init, where it is one of INITS (a layer's init= argument)."""
    return validate.choice(init, "init", INITS)
