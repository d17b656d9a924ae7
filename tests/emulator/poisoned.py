"""An array module for the emulated launchers: NumPy, except that new arrays
from empty/empty_like come filled with poison instead of whatever memory held.

On a GPU, cupy.empty hands out memory the previous kernel left behind, so an
output element no thread writes is a silent bug there. Under the emulator,
cuda.Kernels(poisoned.numpy, ...) allocates every output through this module:
floats start as NaN and integers as their most negative value (no valid index
or count), so such an element fails the comparison with NumPy.
"""
import numpy as _numpy


def poison(a):
    """Fill a with NaN (floats, complex) or its type's extreme value (integers)."""
    kind = a.dtype.kind
    if kind in "fc":
        a.fill(_numpy.nan)
    elif kind == "i":
        a.fill(_numpy.iinfo(a.dtype).min)
    elif kind == "u":
        a.fill(_numpy.iinfo(a.dtype).max)
    elif kind == "b":
        a.fill(True)
    return a


class PoisonedNumpy:
    """numpy, with empty and empty_like returning poisoned arrays."""

    def __getattr__(self, name):
        return getattr(_numpy, name)

    @staticmethod
    def empty(shape, dtype=float, order="C"):
        return poison(_numpy.empty(shape, dtype=dtype, order=order))

    @staticmethod
    def empty_like(prototype, dtype=None, order="K", subok=True, shape=None):
        return poison(_numpy.empty_like(prototype, dtype=dtype, order=order, subok=subok,
                                        shape=shape))

    def __repr__(self):
        return "<numpy with poisoned empty/empty_like (tests/emulator/poisoned.py)>"


numpy = PoisonedNumpy()
