"""The CUDA backend: CuPy (or the module playing it, gpucnn.backend.set_cupy_module)
and the hand-written kernels of kernels/*.cu."""
import contextlib

from .kernels import KERNELS, NVRTC_OPTIONS, compile_units, kernels_for, name_expressions, source

__all__ = ["CudaOps", "ops_for", "kernels_for", "KERNELS", "NVRTC_OPTIONS", "compile_units",
           "name_expressions", "source"]


class CudaOps:
    """The GPU's side of the backend interface (gpucnn.backend.ops_for(cupy)): the
    kernels' launchers for one device; a GPU's work is queued whole, so the
    batch-sharing helpers run their function once."""

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


_ops = {}


def ops_for(xp):
    """The CudaOps serving arrays of xp on its current device (cached per device)."""
    kernels = kernels_for(xp)
    ops = _ops.get(id(kernels))
    if ops is None or ops.kernels is not kernels:
        ops = _ops[id(kernels)] = CudaOps(kernels)
    return ops
