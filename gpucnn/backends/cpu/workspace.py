"""Arrays a layer's forward builds for its own backward, kept from step to step.

A convolution's padded channels-last input and BatchNorm's centred input live
from a layer's forward to its backward, and are freed after it. NumPy gives memory
that large back to the system when it is freed, and the next step's forward faults
it in again page by page: kept by their layers, these arrays fault in once, and a
step spends that time computing instead (docs/benchmarks.md). One array a slot:
the next forward overwrites what the last one built, which the layer's backward
has read by then (a layer runs one backward for its last forward; see
Module._take). Layers use it in training
only: an eval forward (Module.summary's between a forward and its backward, or
several threads running one model) gets fresh arrays, as it always did.

On a GPU CuPy's memory pool already reuses memory: the arrays are fresh.
"""
import numpy


class Workspace:
    """A layer's kept arrays, one a slot (a name), replaced when the shape or dtype changes."""

    def __init__(self):
        self._arrays = {}

    def empty(self, xp, slot, shape, dtype):
        """An uninitialised array for `slot`: the slot's memory where it is a NumPy
        array of this shape and dtype already, else a new one that the slot keeps."""
        if xp is not numpy:
            return xp.empty(shape, dtype)
        shape, dtype = tuple(shape), numpy.dtype(dtype)
        a = self._arrays.get(slot)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._arrays[slot] = numpy.empty(shape, dtype)
        return a

    def clear(self):
        """Give the kept memory back (the next forward allocates it again)."""
        self._arrays.clear()


def empty(xp, workspace, slot, shape, dtype):
    """workspace.empty(...), or a fresh array where workspace is None (the functional API)."""
    if workspace is None:
        return xp.empty(shape, dtype)
    return workspace.empty(xp, slot, shape, dtype)
