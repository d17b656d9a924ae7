"""The arithmetic of float32 convolutions on a GPU: one process-wide setting.

    fp32     FP32 multiply-adds on the CUDA cores (the SIMT kernels)
    tf32     the tensor cores in TF32: each operand rounded to 10 mantissa bits,
             products accumulated in FP32 (PyTorch's default for convolutions,
             torch.backends.cudnn.allow_tf32)
    3xtf32   the tensor cores, each operand split into a TF32 big and small part
             and big*big + big*small + small*big accumulated in FP32: about FP32's
             accuracy at tensor-core speed

Unset, a GPU uses ``tf32`` for float32, as PyTorch does. Float64 always computes in
FP64, and the CPU always in FP32/FP64 (NumPy); ``explicit()`` tells whether a
tensor-core precision was asked for, so that the application can say once that it
does not apply there. Each precision is deterministic: same inputs, same bits.
"""
import contextlib

import numpy

from ..validate import choice

PRECISIONS = ("fp32", "tf32", "3xtf32")
GPU_DEFAULT = "tf32"
TENSOR_CORE = ("tf32", "3xtf32")

_setting = None  # None: the default


def set_conv_precision(precision):
    """Set the arithmetic of float32 convolutions on a GPU ('fp32', 'tf32', '3xtf32',
    or None for the default, 'tf32'); returns the previous setting.

    >>> import gpucnn
    >>> previous = gpucnn.set_conv_precision("3xtf32")
    >>> gpucnn.get_conv_precision()
    '3xtf32'
    >>> _ = gpucnn.set_conv_precision(previous)
    """
    global _setting
    if precision is not None:
        precision = choice(precision, "precision", PRECISIONS)
    previous, _setting = _setting, precision
    return previous


def get_conv_precision():
    """The precision float32 convolutions run with on a GPU."""
    return _setting or GPU_DEFAULT


def explicit():
    """The precision set with set_conv_precision, or None where it was left unset."""
    return _setting


@contextlib.contextmanager
def conv_precision(precision):
    """Run the block with float32 convolutions on a GPU at this precision."""
    previous = set_conv_precision(precision)
    try:
        yield
    finally:
        set_conv_precision(previous)


def for_dtype(dtype, tensor_cores=True):
    """The precision a GPU convolution of this dtype runs with: the setting for
    float32 on a GPU with tensor cores for TF32 (compute capability 8.0 and later),
    'fp32' for everything else (float64 computes in FP64, without TF32)."""
    if numpy.dtype(dtype) != numpy.float32 or not tensor_cores:
        return "fp32"
    return get_conv_precision()
