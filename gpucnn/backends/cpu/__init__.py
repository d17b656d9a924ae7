"""The CPU backend: NumPy, the batch work shared out between gpucnn's threads
(threads.py), the arrays a layer keeps from step to step (workspace.py)."""
import numpy

from . import threads
from .workspace import empty as _workspace_empty


class CpuOps:
    """The CPU's side of the backend interface (gpucnn.backend.ops_for(numpy))."""

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


OPS = CpuOps()
