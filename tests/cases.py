"""Argument grids shared by the op tests, the emulated-kernel tests and the stand-in tests."""

# (x shape, weight shape, kwargs): stride 2 and 3, padding 0/1/2/same/valid,
# dilation 2, groups 2 and depthwise, non-square inputs and kernels, odd sizes, batch 1.
CONV_GRID = [
    ((2, 3, 8, 8), (4, 3, 3, 3), {}),
    ((1, 3, 9, 7), (5, 3, 3, 2), dict(stride=2, padding=1)),
    ((2, 2, 11, 10), (3, 2, 3, 3), dict(stride=3, padding=2)),
    ((2, 4, 9, 8), (6, 2, 3, 3), dict(groups=2, padding=1)),
    ((2, 4, 9, 8), (4, 1, 3, 3), dict(groups=4, padding="same")),
    ((2, 4, 9, 8), (8, 1, 5, 3), dict(groups=4, stride=2)),
    ((1, 3, 10, 9), (2, 3, 3, 3), dict(dilation=2, padding=2)),
    ((2, 3, 12, 11), (4, 3, 3, 2), dict(dilation=(2, 1), stride=(2, 3), padding=(1, 0))),
    ((2, 3, 8, 7), (4, 3, 4, 2), dict(padding="same")),
    ((2, 3, 8, 7), (4, 3, 4, 3), dict(padding="same", dilation=2)),
    ((2, 3, 7, 7), (4, 3, 7, 7), dict(padding="valid")),
    ((3, 1, 5, 5), (2, 1, 1, 1), {}),
    ((2, 6, 7, 9), (6, 3, 2, 4), dict(groups=2, stride=(1, 2), padding=(2, 1), dilation=(1, 2))),
    # stride 1 with 16+ channels a group: dx as the forward pass over dy (groups,
    # dilation, uneven padding); padding beyond the filter's extent: tap by tap
    ((2, 32, 9, 8), (6, 16, 3, 2), dict(groups=2, dilation=(2, 3), padding=(1, 3))),
    ((2, 17, 8, 7), (5, 17, 4, 3), dict(padding="same", dilation=2)),
    ((2, 16, 6, 6), (4, 16, 1, 1), dict(padding=1)),
    ((2, 3, 6, 6), (4, 3, 1, 1), dict(padding=1)),
    ((2, 3, 6, 5), (4, 3, 3, 3), dict(padding=(3, 1))),
]

# (x shape, kwargs) of both poolings: overlapping windows, padding, ceil_mode,
# non-square, batch 1.
POOL_GRID = [
    ((2, 3, 8, 8), dict(kernel_size=2)),
    ((1, 2, 9, 7), dict(kernel_size=3, stride=2, padding=1)),
    ((2, 2, 9, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((2, 2, 10, 9), dict(kernel_size=3, stride=1)),
    ((2, 2, 10, 9), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))),
    ((2, 2, 11, 10), dict(kernel_size=2, stride=3, ceil_mode=True)),
    ((2, 2, 5, 5), dict(kernel_size=4, stride=2, padding=2, ceil_mode=True)),
]

MAX_POOL_GRID = POOL_GRID + [
    # dilation: overlapping dilated windows, per-axis dilation with padding and
    # ceil_mode, a last window overhanging the end, a window longer than the input
    ((2, 2, 9, 8), dict(kernel_size=3, stride=1, padding=1, dilation=2)),
    ((1, 2, 11, 10), dict(kernel_size=(2, 3), stride=(2, 1), padding=1, dilation=(3, 2),
                          ceil_mode=True)),
    ((2, 1, 8, 9), dict(kernel_size=3, stride=2, dilation=2, ceil_mode=True)),
    ((2, 2, 5, 6), dict(kernel_size=3, stride=3, dilation=3, ceil_mode=True)),
    ((1, 3, 6, 7), dict(kernel_size=(1, 2), stride=1, padding=(0, 1), dilation=(5, 4))),
]

# ceil_mode's last windows overhanging the padded input, one longer than the input
AVG_POOL_GRID = POOL_GRID + [
    ((1, 2, 6, 7), dict(kernel_size=(5, 3), stride=(3, 2), padding=(2, 1), ceil_mode=True)),
    ((2, 1, 2, 3), dict(kernel_size=3, stride=3, ceil_mode=True)),
]

AVG_POOL_DIVISORS = [  # count_include_pad, divisor_override
    (True, None), (False, None), (True, 3), (False, -2)]
