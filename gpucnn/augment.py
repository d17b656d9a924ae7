"""Data augmentation on the device, a whole batch at once: random crop with
padding and random horizontal flip (torchvision's RandomCrop(size, padding) and
RandomHorizontalFlip(0.5), drawn per sample).

For a batch x (N, C, H, W): pad by p on every side with `fill`, draw offsets
oy, ox in [0, 2p] and a flip bit per sample, then gather
    out[n, c, i, j] = padded[n, c, oy_n + i, col_n(j)],
    col_n(j) = ox_n + (W - 1 - j if flip_n else j)
with index arithmetic on the array module (NumPy or CuPy): no Python loop over
samples. The random numbers come from a generator seeded by (seed, batch
counter), so the state is two ints that checkpoints store: a resumed run draws
the same crops and flips as an uninterrupted one, on either device
(gpucnn.random.host_generator: the same numbers for the CPU and the GPU).
"""
from . import backend, random, validate


class Augment:
    """Callable batch transform: x (N, C, H, W) -> augmented x of the same shape and dtype.

    padding: pixels of padding for the random crop (0: no crop).
    flip: random horizontal flip with probability 1/2.
    fill: the value padded in; gpucnn's images are standardised, so train() passes
          the standardised value of a black pixel, which is where torchvision's
          RandomCrop pads with zeros before normalisation.
    rank, ranks: one of `ranks` data-parallel ranks, each holding samples rank,
          rank + ranks, ... of a global batch (gpucnn.distributed.shard): the draws
          are made for the global batch and each rank applies its share, so R ranks
          augment exactly as one process of the global batch does.
    """

    def __init__(self, padding=0, flip=False, fill=0.0, seed=0, rank=0, ranks=1):
        self.padding = validate.integer(padding, "padding", 0)
        self.fill = validate.number(fill, "fill", finite=False, error=TypeError, what="a number")
        self.flip = bool(flip)
        self.seed = validate.integer(seed, "seed", 0, type_error=TypeError)
        self.ranks = validate.positive_int(ranks, "ranks", type_error=TypeError)
        self.rank = validate.integer(rank, "rank", 0, type_error=TypeError)
        if self.rank >= self.ranks:
            raise ValueError(f"rank must lie in [0, {self.ranks - 1}] for {self.ranks} ranks, "
                             f"got {self.rank}")
        self.calls = 0

    def get_rng_state(self):
        return {"seed": self.seed, "calls": self.calls}

    def set_rng_state(self, state):
        self.seed, self.calls = int(state["seed"]), int(state["calls"])

    def __call__(self, x):
        if not hasattr(x, "ndim") or x.ndim != 4:
            raise ValueError(f"Augment needs a batch (N, C, H, W), got shape "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if not self.padding and not self.flip:
            return x
        xp = backend.get_array_module(x)
        gen = random.host_generator(self.seed, self.calls)
        self.calls += 1
        N, C, H, W = x.shape
        p = self.padding
        # All the random numbers in one fixed order (the checkpoints' draws depend on it),
        # drawn on the host on every device for the global batch, this rank's share
        # handed over as arrays of xp (on a GPU an asynchronous copy of 2N ints, N bools)
        share = slice(self.rank, None, self.ranks)
        drawn = N * self.ranks
        oy = xp.asarray(gen.integers(0, 2 * p + 1, drawn)[share]) if p else xp.zeros(N, xp.int64)
        ox = xp.asarray(gen.integers(0, 2 * p + 1, drawn)[share]) if p else xp.zeros(N, xp.int64)
        flip = xp.asarray(gen.random(drawn)[share] < 0.5) if self.flip else xp.zeros(N, bool)
        if p:
            x = xp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=self.fill)
        j = xp.arange(W)
        cols = ox[:, None] + xp.where(flip[:, None], W - 1 - j, j)   # (N, W)
        rows = oy[:, None] + xp.arange(H)                              # (N, H)
        n = xp.arange(N)[:, None, None, None]
        c = xp.arange(C)[None, :, None, None]
        return x[n, c, rows[:, None, :, None], cols[:, None, None, :]]

    def __repr__(self):
        return f"Augment(padding={self.padding}, flip={self.flip}, fill={self.fill:g})"
