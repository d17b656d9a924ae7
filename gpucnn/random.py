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


def normal(shape, std, dtype=numpy.float32):
    """N(0, std^2) on the host (Kaiming-normal initialisation)."""
    return _rng.normal(0.0, std, size=shape).astype(dtype)


def stream_seed(seed, counter):
    """A seed for the counter-th draw of a stream: random layers and augmentation
    draw each batch from a fresh generator seeded by (their seed, a call counter),
    so their whole state is two ints that a checkpoint stores and restores exactly."""
    return int(numpy.random.SeedSequence([seed, counter]).generate_state(1, numpy.uint64)[0] >> 1)


def generator(xp, seed, counter):
    """The Generator for draw number `counter` of stream `seed`, whose draws are arrays
    of xp (numpy, or CuPy's module for the GPU).

    Every device draws the same numbers: NumPy's PCG64 on the host. CuPy's own
    generator (XORWOW) would draw other crops, flips and dropout masks on the GPU than
    on the CPU, so a run resumed on the other device, or compared with it, would train
    on other data. On the GPU each draw is copied to the device asynchronously
    (CuPy stages it through pinned memory on the current stream): no sync. The price
    is host time: a few small arrays per batch for augmentation, but for Dropout a
    mask as large as its input per forward."""
    host = host_generator(seed, counter)
    return host if xp is numpy else _DeviceDraws(host, xp)


def host_generator(seed, counter):
    """The host Generator for draw number `counter` of stream `seed` (what generator
    wraps): for a caller that reduces a draw on the host before it goes to the device,
    as Dropout sends its keep mask as bools, a quarter of the floats' bytes."""
    return numpy.random.default_rng(stream_seed(seed, counter))


class _DeviceDraws:
    """A host Generator whose draws come back as arrays of another array module."""

    def __init__(self, host, xp):
        self._host, self._xp = host, xp

    def __getattr__(self, name):
        method = getattr(self._host, name)  # AttributeError for what a Generator lacks

        def draw(*args, **kwargs):
            return self._xp.asarray(method(*args, **kwargs))
        return draw
