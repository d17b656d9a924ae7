"""The pooling kernels' launchers (kernels/max_pool2d.cu, kernels/avg_pool2d.cu):
gathers, one thread per output (forward) or per input pixel (backward), each
summing in a fixed order; grid-stride loops of THREADS-thread blocks."""
from .loader import DEFAULT, THREADS, Build, KernelFile, blocks, i32

MAX_POOL_FILE = KernelFile("max_pool2d.cu", ("max_pool2d_forward", "max_pool2d_backward"), {
    DEFAULT: Build((), dict.fromkeys(("max_pool2d_forward", "max_pool2d_backward"), THREADS))})
AVG_POOL_FILE = KernelFile("avg_pool2d.cu", ("avg_pool2d_forward", "avg_pool2d_backward"), {
    DEFAULT: Build((), dict.fromkeys(("avg_pool2d_forward", "avg_pool2d_backward"), THREADS))})
FILES = (MAX_POOL_FILE, AVG_POOL_FILE)


def _max_args(g):
    return i32(g.N, g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw)


def _avg_args(g):
    return i32(g.N, g.C, g.H, g.W, g.R, g.S, g.P, g.Q, g.sh, g.sw, g.ph, g.pw,
               g.count_include_pad, g.divisor_override or 0)


class PoolLaunchers:
    """The pooling passes on one device (a part of kernels.Kernels, with a Loader)."""

    def max_pool2d_forward(self, x, g):
        """(y, indices) (N, C, P, Q): one thread per output scans its window."""
        x = self._c(x)
        y = self.xp.empty((g.N, g.C, g.P, g.Q), dtype=x.dtype)
        indices = self.xp.empty((g.N, g.C, g.P, g.Q), dtype=self.xp.int64)
        if y.size == 0:
            return y, indices
        self._launch(MAX_POOL_FILE, "max_pool2d_forward", x.dtype, (blocks(y.size),),
                     (THREADS,), (x, y, indices, *_max_args(g)))
        return y, indices

    def max_pool2d_backward(self, dy, indices, g):
        """dx (N, C, H, W): one thread per input pixel gathers from the windows covering it."""
        dy, indices = self._c(dy), self._c(indices.astype(self.xp.int64, copy=False))
        dx = self.xp.empty((g.N, g.C, g.H, g.W), dtype=dy.dtype)
        if dx.size == 0:
            return dx
        self._launch(MAX_POOL_FILE, "max_pool2d_backward", dy.dtype, (blocks(dx.size),),
                     (THREADS,), (dy, indices, dx, *_max_args(g)))
        return dx

    def avg_pool2d_forward(self, x, g):
        """y (N, C, P, Q): one thread per output sums its window."""
        x = self._c(x)
        y = self.xp.empty((g.N, g.C, g.P, g.Q), dtype=x.dtype)
        if y.size == 0:
            return y
        self._launch(AVG_POOL_FILE, "avg_pool2d_forward", x.dtype, (blocks(y.size),),
                     (THREADS,), (x, y, *_avg_args(g)))
        return y

    def avg_pool2d_backward(self, dy, g):
        """dx (N, C, H, W): one thread per input pixel gathers the windows' shares."""
        dy = self._c(dy)
        dx = self.xp.empty((g.N, g.C, g.H, g.W), dtype=dy.dtype)
        if dx.size == 0:
            return dx
        self._launch(AVG_POOL_FILE, "avg_pool2d_backward", dy.dtype, (blocks(dx.size),),
                     (THREADS,), (dy, dx, *_avg_args(g)))
        return dx
