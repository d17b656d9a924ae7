"""The library's seeded random state (weight initialisation, dropout, shuffling)."""
import numpy

_rng = numpy.random.default_rng(0)


def manual_seed(seed):
    """Reseed everything gpucnn draws at random, like torch.manual_seed."""
    global _rng
    _rng = numpy.random.default_rng(seed)


def host_rng():
    """The NumPy Generator that layers draw their initial weights and seeds from."""
    return _rng


def uniform(shape, bound, dtype=numpy.float32):
    """U(-bound, bound) on the host, the distribution of PyTorch's default init."""
    return _rng.uniform(-bound, bound, size=shape).astype(dtype)
