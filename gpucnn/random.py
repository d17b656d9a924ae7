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


def host_generator(seed, counter):
    """The host Generator (NumPy's PCG64) for draw number `counter` of stream `seed`.

    Every device draws from it: CuPy's own generator (XORWOW) would draw other crops,
    flips and dropout masks on the GPU than on the CPU, so a run resumed on the other
    device, or compared with it, would train on other data. A caller reduces its draw
    on the host as far as it can (Dropout's keep mask to bools) and hands it to the
    device with xp.asarray, an asynchronous copy (CuPy stages it through pinned memory
    on the current stream): no sync, and on the CPU no copy at all."""
    return numpy.random.default_rng(stream_seed(seed, counter))
