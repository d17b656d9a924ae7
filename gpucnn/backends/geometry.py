"""The geometry records every device's convolution and pooling take.

gpucnn.functional checks an op's arguments and computes its geometry once; each
backend (backends/cpu, backends/cuda) gets it whole, so that neither parses
arguments again nor imports the functional layer above it.
"""
from collections import namedtuple

import numpy

ConvGeometry = namedtuple(
    "ConvGeometry", "N C H W K R S P Q sh sw pt pb pl pr dh dw groups")
ConvGeometry.__doc__ = """A convolution's sizes: input (N, C, H, W), weight (K, C/groups, R, S),
output (N, K, P, Q); stride (sh, sw), padding top/bottom/left/right (pt, pb, pl, pr),
dilation (dh, dw) and groups."""

PoolGeometry = namedtuple(
    "PoolGeometry", "N C H W R S P Q sh sw ph pw dh dw count_include_pad divisor_override",
    defaults=(1, 1, True, None))
PoolGeometry.__doc__ = """A pooling's sizes: input (N, C, H, W), window (R, S), output
(N, C, P, Q); stride (sh, sw), padding (ph, pw) on each side, dilation (dh, dw), and
average pooling's divisor rule (count_include_pad, divisor_override)."""


def first_inside(start, size, step, taps):
    """Per window start (an int array): the first tap t with 0 <= start + t*step < size,
    or taps if there is none."""
    t = numpy.maximum(0, -(start // step))  # ceil(-start / step) for start < 0
    return numpy.where((t < taps) & (start + t * step < size), t, taps)
