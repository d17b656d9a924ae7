"""The CPU backend: NumPy, the batch work shared out between gpucnn's threads
(threads.py), the arrays a layer keeps from step to step (workspace.py), the
convolution (conv.py) and pooling (pool.py) passes."""
import warnings

import numpy

from .. import precision
from . import conv, pool, threads
from .workspace import empty as _workspace_empty


class CpuOps:
    """The CPU's side of the backend interface (gpucnn.backend.ops_for(numpy)).

    The device interface (the same on CudaOps) takes checked arrays and the op's
    geometry (gpucnn.backends.geometry):
    conv2d_forward(x, weight, bias, g, workspace=None) -> (y, saved)
    conv2d_backward_data(dy, weight, g) -> dx
    conv2d_backward_filter(dy, x, g, saved=None) -> dweight
    conv2d_backward_bias(dy) -> dbias
    max_pool2d_forward(x, g) -> (y, indices); max_pool2d_backward(dy, indices, g) -> dx
    avg_pool2d_forward(x, g) -> y; avg_pool2d_backward(dy, g) -> dx
    saved is what the forward pass built that backward_filter reads again (here the
    padded input; None on a GPU); workspace is where a layer keeps it from step to step.
    """

    xp = numpy
    name = "cpu"
    # the products a reduction forms go a few samples at a time through a work
    # buffer of about this size, so that they are summed while in the L2 cache
    cache_chunk_bytes = 256 << 10

    # the batch work shared out between the threads (threads.py)
    def section(self):
        return threads.section(numpy)

    def ranges(self, fn, count, at_least=1):
        return threads.ranges(numpy, fn, count, at_least)

    def rows(self, fn, out, *arrays):
        return threads.rows(numpy, fn, out, *arrays)

    def sample_rows(self, *arrays):
        return threads.sample_rows(numpy, *arrays)

    def scratch(self, slot, shape, dtype):
        return threads.scratch(numpy, slot, shape, dtype)

    def copyto(self, out, src, axis=0):
        return threads.copyto(numpy, out, src, axis)

    def kept(self, workspace, slot, shape, dtype):
        """An uninitialised array a layer keeps from step to step in its workspace
        (a fresh one where workspace is None)."""
        return _workspace_empty(numpy, workspace, slot, shape, dtype)

    # convolution (conv.py)
    def conv_precision(self, dtype):
        """What float32 (and float64) convolutions compute in here: NumPy's FP32/FP64."""
        return "fp32"

    def conv2d_forward(self, x, weight, bias, g, workspace=None):
        if precision.explicit() in precision.TENSOR_CORE:
            warnings.warn(f"conv precision {precision.explicit()!r} applies on a GPU only: the "
                          "CPU computes convolutions in FP32 (float64 in FP64)", stacklevel=2)
        return conv.forward(x, weight, bias, g, workspace)

    def conv2d_backward_data(self, dy, weight, g):
        return conv.backward_data(dy, weight, g)

    def conv2d_backward_filter(self, dy, x, g, saved=None):
        return conv.backward_filter(dy, x, g, saved)

    def conv2d_backward_bias(self, dy):
        return conv.backward_bias(dy)

    # pooling (pool.py)
    def max_pool2d_forward(self, x, g):
        return pool.max_forward(x, g)

    def max_pool2d_backward(self, dy, indices, g):
        return pool.max_backward(dy, indices, g)

    def avg_pool2d_forward(self, x, g):
        return pool.avg_forward(x, g)

    def avg_pool2d_backward(self, dy, g):
        return pool.avg_backward(dy, g)


OPS = CpuOps()
