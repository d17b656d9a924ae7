"""BatchNorm2D and functional batch_norm against torch (float64, float32), finite
differences, running statistics, buffers and errors."""
import numpy
import pytest

import gpucnn
from conftest import close
from gpucnn import functional as F
from gpucnn.tools import gradcheck
from gpucnn.nn import BatchNorm2D


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 5, 1, 3), (7, 2), (3, 4, 9)])
@pytest.mark.parametrize("training", [True, False])
def test_functional_matches_torch(torch, rng, dtype, shape, training):
    C = shape[1]
    x = rng.standard_normal(shape) * 3 + 1
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    dy = rng.standard_normal(shape)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    ty = torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training, 0.3, 1e-4)
    ty.backward(torch.tensor(dy))
    c = lambda a: a.astype(dtype)  # noqa: E731
    rm_, rv_ = c(rm), c(rv)
    y, saved = F.batch_norm(c(x), rm_, rv_, c(w), c(b), training=training, momentum=0.3,
                            eps=1e-4)
    dx, dw, db = F.batch_norm_backward(c(dy), saved, c(w))
    for got in (y, dx, dw, db, rm_, rv_):
        assert got.dtype == dtype
    close(y, ty.detach().numpy(), dtype, scale=10)
    close(dx, tx.grad.numpy(), dtype, scale=10)
    close(dw, tw.grad.numpy(), dtype, scale=100)
    close(db, tb.grad.numpy(), dtype, scale=100)
    close(rm_, trm.numpy(), dtype)
    close(rv_, trv.numpy(), dtype)


def test_no_affine_no_running_stats(torch, rng):
    x, dy = rng.standard_normal((3, 2, 4, 4)), rng.standard_normal((3, 2, 4, 4))
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.batch_norm(tx, None, None, training=True).backward(torch.tensor(dy))
    y, saved = F.batch_norm(x, training=True)
    dx, dw, db = F.batch_norm_backward(dy, saved)
    assert dw is None and db is None
    close(dx, tx.grad.numpy(), numpy.float64)


@pytest.mark.parametrize("training", [True, False])
def test_finite_differences(rng, training):
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    inputs = dict(x=rng.standard_normal((3, 3, 4, 2)), weight=rng.standard_normal(3),
                  bias=rng.standard_normal(3))

    def fwd(x, weight, bias):
        return F.batch_norm(x, rm.copy(), rv.copy(), weight, bias, training=training)[0]

    def bwd(G, x, weight, bias):
        saved = F.batch_norm(x, rm.copy(), rv.copy(), weight, bias, training=training)[1]
        dx, dw, db = F.batch_norm_backward(G, saved, weight)
        return dict(x=dx, weight=dw, bias=db)
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False)])
def test_layer_matches_torch_over_steps(torch, rng, momentum, affine, track):
    ours = BatchNorm2D(3, eps=1e-3, momentum=momentum, affine=affine,
                       track_running_stats=track).to(dtype="float64")
    theirs = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=momentum, affine=affine,
                                  track_running_stats=track).double()
    if affine:
        w = rng.standard_normal(3)
        ours.weight.data[...] = w
        theirs.weight.data[...] = torch.tensor(w)
    for step in range(4):
        if step == 3:
            ours.eval(), theirs.eval()
        x, dy = rng.standard_normal((5, 3, 4, 3)) * 2 + step, rng.standard_normal((5, 3, 4, 3))
        tx = torch.tensor(x, requires_grad=True)
        ty = theirs(tx)
        ty.backward(torch.tensor(dy))
        y = ours(x)
        dx = ours.backward(dy)
        close(y, ty.detach().numpy(), numpy.float64)
        close(dx, tx.grad.numpy(), numpy.float64)
    if affine:
        close(ours.weight.grad, theirs.weight.grad.numpy(), numpy.float64)
        close(ours.bias.grad, theirs.bias.grad.numpy(), numpy.float64)
    if track:
        close(ours.running_mean, theirs.running_mean.numpy(), numpy.float64)
        close(ours.running_var, theirs.running_var.numpy(), numpy.float64)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    ours_names = list(ours.state_dict())
    assert ours_names == list(theirs.state_dict())


def test_buffers_in_state_dict_not_in_parameters():
    bn = BatchNorm2D(4)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"]
    assert bn.num_batches_tracked.dtype == numpy.int64 and bn.num_batches_tracked.shape == ()
    opt = gpucnn.SGD(bn.parameters(), lr=1.0, weight_decay=0.5)
    bn(numpy.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(numpy.float32))
    bn.backward(numpy.ones((2, 4, 3, 3), numpy.float32))
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    opt.step()
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert numpy.array_equal(bn.state_dict()[k], before[k])
    bn.to(dtype="float64")
    assert bn.running_var.dtype == numpy.float64 and bn.num_batches_tracked.dtype == numpy.int64


def test_load_state_dict_checks_running_stat_shapes():
    bn = BatchNorm2D(4)
    state = dict(bn.state_dict(), running_var=numpy.ones(3, numpy.float32))
    with pytest.raises(ValueError, match=r"state_dict\['running_var'\] has shape \(3,\), "
                                         r"the model needs \(4,\)"):
        bn.load_state_dict(state)
    state = {k: v + 1 for k, v in BatchNorm2D(4).state_dict().items()}
    bn.load_state_dict(state)
    assert numpy.array_equal(bn.running_mean, numpy.ones(4)) and int(bn.num_batches_tracked) == 1


def test_errors_name_the_layer_and_both_shapes():
    bn = BatchNorm2D(4)
    with pytest.raises(ValueError, match=r"BatchNorm2D\(4, .*\) got input of shape "
                                         r"\(2, 3, 5, 5\); it needs \(N, 4, H, W\)"):
        bn(numpy.zeros((2, 3, 5, 5), numpy.float32))
    with pytest.raises(ValueError, match=r"more than 1 value per channel, got input of shape "
                                         r"\(1, 4, 1, 1\)"):
        bn(numpy.zeros((1, 4, 1, 1), numpy.float32))
    bn.eval()
    assert bn(numpy.ones((1, 4, 1, 1), numpy.float32)).shape == (1, 4, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(numpy.zeros((1, 3)), training=True)
    with pytest.raises(ValueError, match=r"weight has shape \(2,\) but input \(2, 3\)"):
        F.batch_norm(numpy.zeros((2, 3)), weight=numpy.ones(2), training=True)
    with pytest.raises(ValueError, match="momentum must be"):
        BatchNorm2D(3, momentum=2)


def test_deterministic(rng):
    x = rng.standard_normal((8, 5, 6, 6)).astype(numpy.float32)
    runs = []
    for _ in range(2):
        bn = BatchNorm2D(5)
        y = bn(x)
        runs.append((y, bn.backward(y * 0.5), bn.running_var.copy()))
    for a, b in zip(*runs):
        assert numpy.array_equal(a, b)


def test_empty_batch_like_torch(torch):
    bn = BatchNorm2D(3)
    x = numpy.zeros((0, 3, 4, 4), numpy.float32)
    y = bn(x)
    assert y.shape == x.shape
    dx = bn.backward(numpy.zeros_like(x))
    assert dx.shape == x.shape and not bn.weight.grad.any() and not bn.bias.grad.any()
    assert numpy.array_equal(bn.running_mean, numpy.zeros(3))
    assert numpy.array_equal(bn.running_var, numpy.ones(3))
    assert int(bn.num_batches_tracked) == 1  # torch counts the empty batch too


def test_empty_batch_on_the_gpu_path_standin(standin):
    """As on the CPU: the GPU path forms a reduction's products in one chunk of the
    whole batch, which for an empty batch is a chunk of one (no samples) too."""
    bn = BatchNorm2D(3).to("cuda")
    x = standin.asarray(numpy.zeros((0, 3, 4, 4), numpy.float32))
    dx = bn.backward(bn(x))
    assert dx.shape == x.shape
    assert not bn.weight.grad.get().any() and not bn.bias.grad.get().any()
    assert numpy.array_equal(bn.running_var.get(), numpy.ones(3))


def test_float32_sums_on_a_large_map_are_as_accurate_as_torchs(torch):
    """The per-channel sums over a 512x512 map are NumPy's pairwise ones: a plain
    float32 running sum (as einsum's) makes y and dx far less accurate than torch's."""
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((1, 2, 512, 512)) * 2 + 3
    dy = rng.standard_normal(x.shape)
    w, b = numpy.array([1.5, -0.5]), numpy.array([0.2, 0.1])

    def torch_bn(dtype):
        tx = torch.tensor(x, dtype=dtype, requires_grad=True)
        y = torch.nn.functional.batch_norm(tx, None, None, torch.tensor(w, dtype=dtype),
                                           torch.tensor(b, dtype=dtype), training=True)
        y.backward(torch.tensor(dy, dtype=dtype))
        return y.detach().double().numpy(), tx.grad.double().numpy()
    exact = torch_bn(torch.float64)
    theirs = torch_bn(torch.float32)
    f = numpy.float32
    y, saved = F.batch_norm(x.astype(f), weight=w.astype(f), bias=b.astype(f), training=True)
    dx = F.batch_norm_backward(dy.astype(f), saved, w.astype(f))[0]
    for ours, their, ref in zip((y, dx), theirs, exact):
        their_error = numpy.abs(their - ref).max()
        assert numpy.abs(ours - ref).max() <= 4 * their_error + 1e-7


def test_channel_dot_in_chunks_is_bitwise_the_unchunked_sum():
    from gpucnn.functional import batchnorm
    ops = gpucnn.backend.ops_for(numpy)
    rng = numpy.random.default_rng(0)
    a, b = (rng.standard_normal((37, 3, 61, 67)).astype(numpy.float32) for _ in range(2))
    assert a[:1].nbytes * 2 < ops.cache_chunk_bytes < a.nbytes  # several uneven chunks
    whole = (a * b).reshape(37, 3, -1).sum(axis=2).sum(axis=0)
    numpy.testing.assert_array_equal(batchnorm._channel_dot(ops, a, b), whole)
    numpy.testing.assert_array_equal(batchnorm._channel_dot(ops, a[:, 1:], b[:, 1:]), whole[1:])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("training", [True, False])
def test_every_layout_gives_the_contiguous_inputs_bits(cpu_threads, threads, training):
    """Contiguous samples go through the per-channel steps as rows of a sample
    (the backend ops.sample_rows), other layouts by broadcasting: the same bits. (Not
    channels-last: its per-channel sums run in its memory order, which can round
    them differently, before and after sample_rows alike.)"""
    cpu_threads(threads)
    rng = numpy.random.default_rng(7)
    x = rng.standard_normal((6, 4, 5, 7)).astype(numpy.float32) * 3 + 1
    dy = rng.standard_normal(x.shape).astype(numpy.float32)
    w, b = rng.standard_normal(4).astype(numpy.float32), rng.standard_normal(4).astype(numpy.float32)

    def inside(a, shape, where):  # a's values, a view into a bigger array
        big = numpy.zeros(shape, a.dtype)
        big[where] = a
        return big[where]

    def layouts(a):
        N, C, H, W = a.shape
        yield inside(a, (N, C, H, 2 * W), (..., slice(None, None, 2)))  # broadcast
        yield inside(a, (N, C + 1, H, W), (slice(None), slice(1, None)))  # rows
        yield inside(a, (2 * N, C, H, W), slice(None, None, 2))  # rows, samples apart

    def run(xl, dyl, affine):
        stats = numpy.zeros(4, numpy.float32), numpy.ones(4, numpy.float32)
        y, saved = F.batch_norm(xl, *stats, *((w, b) if affine else (None, None)), training)
        return (y, *F.batch_norm_backward(dyl, saved, w if affine else None), *stats)

    for affine in (True, False):
        reference = run(x, dy, affine)
        for xl, dyl in zip(layouts(x), layouts(dy)):
            assert numpy.array_equal(xl, x) and not xl.flags.c_contiguous
            for ours, want in zip(run(xl, dyl, affine), reference):
                assert (ours is None) == (want is None)
                if ours is not None:
                    assert ours.shape == want.shape
                    assert numpy.ascontiguousarray(ours).tobytes() == want.tobytes()
