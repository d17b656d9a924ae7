"""The arrays a layer's forward builds for its backward are kept from step to step
(gpucnn.workspace): the same numbers as fresh arrays, the memory reused, and the
functional API still giving fresh arrays."""
import types

import numpy

from gpucnn import BatchNorm2D, Conv2D, Sequential
from gpucnn import functional as F
from gpucnn.backends.cpu.workspace import Workspace


def _batch(seed, shape=(4, 3, 6, 6)):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(numpy.float32)


def _net():
    # channels-last im2col on both convs (9 > 6 and 24 > 6 values a window row)
    return Sequential(Conv2D(3, 8, 3, padding=1, bias=False), BatchNorm2D(8),
                      Conv2D(8, 5, 3, padding=1))


def _step(net, x, dy):
    net.zero_grad()
    y = net(x)
    dx = net.backward(dy)
    return [y, dx] + [p.grad.copy() for _, p in net.named_parameters()]


def test_a_layer_reuses_its_kept_arrays_and_gets_the_numbers_of_fresh_ones():
    kept, fresh = _net(), _net()
    fresh.load_state_dict(kept.state_dict())
    dy = _batch(9, (4, 5, 6, 6))
    conv, bn = kept[0], kept[1]
    memory = []
    for seed in (1, 2, 3):
        x = _batch(seed)
        y = kept(x)
        memory.append((conv._ctx.source, bn._ctx.centred))
        got = [y, kept.backward(dy)] + [p.grad.copy() for _, p in kept.named_parameters()]
        kept.zero_grad()
        fresh_layers = _net()  # a new net each step: nothing kept from before
        fresh_layers.load_state_dict(fresh.state_dict())
        for a, b in zip(got, _step(fresh_layers, x, dy)):
            numpy.testing.assert_array_equal(a, b)
    for source, centred in memory[1:]:
        assert numpy.shares_memory(source, memory[0][0])
        assert numpy.shares_memory(centred, memory[0][1])


def test_backward_differentiates_the_last_forward():
    kept, fresh = _net(), _net()
    fresh.load_state_dict(kept.state_dict())
    dy = _batch(9, (4, 5, 6, 6))
    kept(_batch(1))  # overwritten by the next forward, in the same kept memory
    kept(_batch(2))
    got = [kept.backward(dy)] + [p.grad.copy() for _, p in kept.named_parameters()]
    want = _step(fresh, _batch(2), dy)[1:]
    for a, b in zip(got, want):
        numpy.testing.assert_array_equal(a, b)


def test_an_eval_forward_keeps_nothing_and_leaves_a_pending_backward_alone():
    """Module.summary runs an eval forward between a training forward and its
    backward; with a batch of one its shapes are the training batch's."""
    kept, fresh = _net(), _net()
    fresh.load_state_dict(kept.state_dict())
    x, dy = _batch(1, (1, 3, 6, 6)), _batch(9, (1, 5, 6, 6))
    kept(x)
    kept.summary((3, 6, 6), print_fn=lambda line: None)
    got = [kept.backward(dy)] + [p.grad.copy() for _, p in kept.named_parameters()]
    for a, b in zip(got, _step(fresh, x, dy)[1:]):
        numpy.testing.assert_array_equal(a, b)
    kept.eval()
    kept[1](_batch(1, (1, 8, 6, 6)))
    second = kept[1]._ctx.centred
    kept[1](_batch(2, (1, 8, 6, 6)))
    assert not numpy.shares_memory(second, kept[1]._ctx.centred)


def test_to_gives_the_kept_memory_back():
    net = _net()
    net(_batch(1))
    before = net[0]._ctx.source
    net.to(dtype=numpy.float64)
    net(_batch(1).astype(numpy.float64))
    assert not numpy.shares_memory(net[0]._ctx.source, before)


def test_the_functional_api_gives_fresh_arrays():
    x, w = _batch(1), numpy.ones(3, numpy.float32)
    a = F.batch_norm(x, weight=w, bias=w, training=True)[1].centred
    b = F.batch_norm(x, weight=w, bias=w, training=True)[1].centred
    assert not numpy.shares_memory(a, b)
    wt = _batch(2, (8, 3, 3, 3))
    g = F.conv.geometry(x, wt, padding=1)
    s1, s2 = (F.conv.forward(x, wt, None, g)[1].source for _ in range(2))
    assert not numpy.shares_memory(s1, s2)


def test_workspace_keeps_one_array_a_slot_and_none_off_numpy():
    ws = Workspace()
    a = ws.empty(numpy, "s", (2, 3), numpy.float32)
    assert ws.empty(numpy, "s", (2, 3), numpy.float32) is a
    assert ws.empty(numpy, "t", (2, 3), numpy.float32) is not a
    b = ws.empty(numpy, "s", (3, 2), numpy.float32)
    assert b.shape == (3, 2) and b is not a
    assert ws.empty(numpy, "s", (3, 2), numpy.float64).dtype == numpy.float64
    other = types.SimpleNamespace(empty=numpy.empty)  # an array module other than NumPy
    assert other is not numpy
    first = ws.empty(other, "u", (2,), numpy.float32)
    assert ws.empty(other, "u", (2,), numpy.float32) is not first
    ws.clear()
    assert ws.empty(numpy, "s", (3, 2), numpy.float64) is not b
