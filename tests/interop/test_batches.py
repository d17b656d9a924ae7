"""gpucnn.batches: mini-batches over arrays."""
import numpy
import pytest

import gpucnn


def test_in_order_with_a_short_last_batch():
    x, y = numpy.arange(20).reshape(10, 2), numpy.arange(10)
    out = list(gpucnn.batches(x, y, 4))
    assert [len(yb) for _, yb in out] == [4, 4, 2]
    numpy.testing.assert_array_equal(numpy.concatenate([xb for xb, _ in out]), x)
    assert numpy.shares_memory(out[0][0], x)  # a view, not a copy


def test_shuffled_batches_cover_every_sample_once_and_repeat_with_a_seed():
    x = numpy.arange(10) * 10
    y = numpy.arange(10)
    first = list(gpucnn.batches(x, y, 3, shuffle=True, seed=7))
    again = list(gpucnn.batches(x, y, 3, shuffle=True, seed=7))
    other = list(gpucnn.batches(x, y, 3, shuffle=True, seed=8))
    ys = numpy.concatenate([yb for _, yb in first])
    assert sorted(ys) == list(range(10)) and list(ys) != list(range(10))
    for xb, yb in first:  # pairs stay together
        numpy.testing.assert_array_equal(xb, yb * 10)
    assert all((a[1] == b[1]).all() for a, b in zip(first, again))
    assert any((a[1] != b[1]).any() for a, b in zip(first, other))


def test_shuffle_without_a_seed_follows_manual_seed():
    x = numpy.arange(50)
    gpucnn.manual_seed(3)
    a = numpy.concatenate(list(gpucnn.batches(x, batch_size=8, shuffle=True)))
    gpucnn.manual_seed(3)
    b = numpy.concatenate(list(gpucnn.batches(x, batch_size=8, shuffle=True)))
    numpy.testing.assert_array_equal(a, b)


def test_drop_last_and_x_alone():
    out = list(gpucnn.batches(numpy.zeros((10, 3)), batch_size=4, drop_last=True))
    assert [b.shape for b in out] == [(4, 3), (4, 3)]


def test_torch_tensors_come_in_as_arrays():
    torch = pytest.importorskip("torch")
    xb, yb = next(gpucnn.batches(torch.ones(5, 2), torch.arange(5), 2))
    assert isinstance(xb, numpy.ndarray) and list(yb) == [0, 1]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(y=numpy.zeros(3)), ValueError, "same number of samples, got 4 and 3"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int, got 0"),
    (dict(batch_size=2.0), TypeError, "batch_size must be a positive int, got float 2.0"),
    (dict(shuffle=1), TypeError, "shuffle must be a bool, got 1"),
    (dict(seed=-1), ValueError, "seed must be None or an int >= 0, got -1"),
    (dict(x=numpy.float32(1)), TypeError, r"x must be an array with one sample per row")])
def test_bad_arguments_are_named_before_the_first_batch(kwargs, error, match):
    args = dict(x=numpy.zeros((4, 2)), y=None, batch_size=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        gpucnn.batches(**args)
