"""Argument checks and size rules shared by every functional op.

Each check raises TypeError or ValueError naming the argument, what it got and
what it needs, before any work is done.
"""
import numpy

from ..validate import is_int, pair  # noqa: F401  (pair: the functional ops' name for it)

FLOAT_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def output_size(size, kernel, stride, pad_total, dilation=1, ceil_mode=False, name="output"):
    """PyTorch's rule: floor((size + pads - dilation*(kernel-1) - 1) / stride) + 1.

    With ceil_mode the division rounds up, but the last window must start
    inside the input or its left padding (PyTorch's pooling rule).
    """
    span = size + pad_total - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= size + pad_total // 2:
            out -= 1
    else:
        out = span // stride + 1
    if out < 1:  # in ceil_mode a window may overhang the end: span > -stride suffices
        raise ValueError(
            f"{name} size would be {out if span >= 0 else 'below 1'}: input size {size} with "
            f"padding {pad_total} is too small for kernel {kernel} (dilation {dilation}, "
            f"stride {stride}); it needs an output size of at least 1")
    return out


def float_array(a, name, ndim=None, xp=None):
    """Check that ``a`` is a float32/float64 array of the given ndim."""
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise TypeError(f"{name} must be an array (numpy or cupy), got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    return a


def same_dtype(ref_name, ref, **others):
    for name, a in others.items():
        if a is not None and a.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but {ref_name} has dtype {ref.dtype}; "
                            "they must match (cast one with .astype)")


def shape_is(a, name, shape):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")


def nchw_shape(shape, name="input_shape"):
    """(N, C, H, W) as ints; N may be 0 (an empty batch), the others are positive."""
    if (not isinstance(shape, (tuple, list)) or len(shape) != 4
            or not all(map(is_int, shape))
            or shape[0] < 0 or min(shape[1:]) < 1):
        raise ValueError(f"{name} must be 4 positive ints (N, C, H, W) (N may be 0), "
                         f"got {shape!r}")
    return tuple(int(v) for v in shape)
