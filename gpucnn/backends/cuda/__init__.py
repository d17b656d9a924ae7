"""The CUDA backend: CuPy (or the module playing it, gpucnn.backend.set_cupy_module)
and the hand-written kernels of kernels/*.cu.

loader.py compiles and loads the kernel files, each described by one record;
conv.py and pool.py hold the launchers with their files' records and tables;
kernels.py assembles them (Kernels, kernels_for); tune_cache.py keeps the tile
configurations `gpucnn tune` chose; graph.py replays a training step from a
CUDA graph.
"""
import contextlib

from .kernels import KERNELS, NVRTC_OPTIONS, compile_units, kernels_for, name_expressions, source

__all__ = ["CudaOps", "ops_for", "kernels_for", "KERNELS", "NVRTC_OPTIONS", "compile_units",
           "name_expressions", "source"]


class CudaOps:
    """The GPU's side of the backend interface (gpucnn.backend.ops_for(cupy)): the
    kernels' launchers for one device (the interface is described on
    gpucnn.backends.cpu.CpuOps). A GPU's work is queued whole, so the batch-sharing
    helpers run their function once; nothing is kept for backward-filter (it reads
    x itself), so saved is None and a workspace is not used."""

    name = "cuda"
    cache_chunk_bytes = None  # a reduction's products are formed whole

    def __init__(self, kernels):
        self.kernels = kernels
        self.xp = kernels.xp

    def section(self):
        return contextlib.nullcontext()

    def ranges(self, fn, count, at_least=1):
        return [fn(0, count)]

    def rows(self, fn, out, *arrays):
        return fn(*arrays, out=out)

    def sample_rows(self, *arrays):
        return None

    def scratch(self, slot, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def copyto(self, out, src, axis=0):
        out[...] = src
        return out

    def kept(self, workspace, slot, shape, dtype):
        return self.xp.empty(shape, dtype)  # CuPy's memory pool reuses the memory already

    # convolution (conv.py)
    def conv_precision(self, dtype):
        """What convolutions of this dtype compute in on this GPU at the current setting
        (gpucnn.set_conv_precision): FP32 for float64 and where there is no TF32."""
        return self.kernels.precision_for(dtype)

    def conv2d_forward(self, x, weight, bias, g, workspace=None):
        return self.kernels.conv2d_forward(x, weight, bias, g), None

    def conv2d_backward_data(self, dy, weight, g):
        return self.kernels.conv2d_backward_data(dy, weight, g)

    def conv2d_backward_filter(self, dy, x, g, saved=None):
        return self.kernels.conv2d_backward_filter(dy, x, g)

    def conv2d_backward_bias(self, dy):
        return self.kernels.conv2d_backward_bias(dy)

    # pooling (pool.py)
    def max_pool2d_forward(self, x, g):
        return self.kernels.max_pool2d_forward(x, g)

    def max_pool2d_backward(self, dy, indices, g):
        return self.kernels.max_pool2d_backward(dy, indices, g)

    def avg_pool2d_forward(self, x, g):
        return self.kernels.avg_pool2d_forward(x, g)

    def avg_pool2d_backward(self, dy, g):
        return self.kernels.avg_pool2d_backward(dy, g)


_ops = {}


def ops_for(xp):
    """The CudaOps serving arrays of xp on its current device (cached per device)."""
    kernels = kernels_for(xp)
    ops = _ops.get(id(kernels))
    if ops is None or ops.kernels is not kernels:
        ops = _ops[id(kernels)] = CudaOps(kernels)
    return ops
