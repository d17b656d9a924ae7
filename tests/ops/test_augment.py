"""On-device augmentation: against a per-sample reference, seeded, resumable."""
import numpy
import pytest

from gpucnn import Augment, backend


def _reference(x, oy, ox, flip, p, fill):
    """torchvision's RandomCrop(padding=p) + RandomHorizontalFlip, one sample at a time."""
    N, C, H, W = x.shape
    padded = numpy.full((N, C, H + 2 * p, W + 2 * p), fill, x.dtype)
    padded[:, :, p:p + H, p:p + W] = x
    out = numpy.empty_like(x)
    for n in range(N):  # a test reference, not a hot path
        crop = padded[n, :, oy[n]:oy[n] + H, ox[n]:ox[n] + W]
        out[n] = crop[:, :, ::-1] if flip[n] else crop
    return out


@pytest.mark.parametrize("padding, flip", [(2, True), (2, False), (0, True), (3, True)])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_matches_per_sample_reference(rng, padding, flip, dtype):
    x = rng.standard_normal((16, 2, 6, 5)).astype(dtype)
    aug = Augment(padding, flip, fill=-0.5, seed=7)
    out = aug(x)
    assert out.dtype == dtype and out.shape == x.shape
    # the same draws as Augment, in its order, from its generator for call 0
    gen = numpy.random.default_rng(__import__("gpucnn").random.stream_seed(7, 0))
    oy = gen.integers(0, 2 * padding + 1, 16) if padding else numpy.zeros(16, int)
    ox = gen.integers(0, 2 * padding + 1, 16) if padding else numpy.zeros(16, int)
    fl = gen.random(16) < 0.5 if flip else numpy.zeros(16, bool)
    assert numpy.array_equal(out, _reference(x, oy, ox, fl, padding, dtype(-0.5)))
    if padding:
        assert len(set(oy.tolist())) > 1
    if flip:
        assert 0 < fl.sum() < 16


def test_seeded_and_state_restores():
    x = numpy.arange(4 * 1 * 5 * 5, dtype=numpy.float32).reshape(4, 1, 5, 5)
    a, b = Augment(2, True, seed=1), Augment(2, True, seed=1)
    assert numpy.array_equal(a(x), b(x))
    state = a.get_rng_state()
    first = a(x)
    assert not numpy.array_equal(first, a(x))
    c = Augment(2, True, seed=99)
    c.set_rng_state(state)
    assert numpy.array_equal(c(x), first)
    assert not numpy.array_equal(Augment(2, True, seed=2)(x), Augment(2, True, seed=1)(x))


def test_keeps_device_and_checks_input():
    x = numpy.zeros((2, 1, 4, 4), numpy.float32)
    assert backend.device_of(Augment(1, True)(x)) == "cpu"
    assert Augment(0, False)(x) is x
    with pytest.raises(ValueError, match=r"Augment needs a batch \(N, C, H, W\), got shape "
                                         r"\(4, 4\)"):
        Augment(1)(x[0, 0])
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        Augment(-1)


def test_the_gpu_draws_the_cpus_crops_and_flips_without_a_sync(standin):
    """The stand-in's own generator draws other numbers than NumPy's, as CuPy's does;
    Augment must not use it: a run resumed on the other device sees the same batches."""
    x = numpy.random.default_rng(0).standard_normal((32, 2, 6, 5)).astype(numpy.float32)
    on_cpu, on_gpu = Augment(2, True, fill=-0.5, seed=4), Augment(2, True, fill=-0.5, seed=4)
    for _ in range(3):  # each call a draw of its own, the state advancing alike
        want = on_cpu(x)
        xd = standin.asarray(x)
        with standin.count_syncs() as syncs:
            got = on_gpu(xd)
        assert syncs() == 0 and isinstance(got, standin.ndarray)
        assert numpy.array_equal(got.get(), want)
    assert on_gpu.get_rng_state() == on_cpu.get_rng_state()


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.7, TypeError), ("1", TypeError)])
def test_a_bad_seed_is_refused_when_made(seed, error):
    with pytest.raises(error, match="seed must be an int >= 0"):
        Augment(padding=2, seed=seed)
