import numpy
import pytest

from cases import CONV_GRID as GRID
from conftest import close
from gpucnn import functional as F
from gpucnn.tools import gradcheck


def _torch_conv(torch, x, w, b, dy, kw):
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    y = torch.nn.functional.conv2d(tx, tw, tb, **kw)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("xs, ws, kw", GRID)
def test_matches_torch(torch, rng, xs, ws, kw, dtype):
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    b = rng.standard_normal(ws[0])
    y = F.conv2d(x.astype(dtype), w.astype(dtype), b.astype(dtype), **kw)
    dy = rng.standard_normal(y.shape)
    ty, tdx, tdw, tdb = _torch_conv(torch, x, w, b, dy, kw)
    dx, dw, db = F.conv2d_backward(dy.astype(dtype), x.astype(dtype), w.astype(dtype), **kw)
    for got in (y, dx, dw, db):
        assert got.dtype == dtype
    assert y.shape == ty.shape and dx.shape == x.shape and dw.shape == w.shape
    close(y, ty, dtype, scale=10)
    close(dx, tdx, dtype, scale=10)
    close(dw, tdw, dtype, scale=100)
    close(db, tdb, dtype, scale=100)


def _random_geometry(rng):
    """A random valid convolution: groups, strides, dilations and paddings 0-4 in
    every combination, filters larger than the input, padding past the filter."""
    while True:
        G = int(rng.choice([1, 1, 2, 3]))
        # 16+ input channels a group take backward-data's other path (FULL_MIN_CHANNELS)
        C, K = G * int(rng.choice([1, 2, 3, 16, 17])), G * int(rng.integers(1, 4))
        R, S, dh, dw = (int(v) for v in rng.integers(1, [6, 6, 4, 4]))
        sh, sw = (int(v) for v in rng.choice([1, 1, 2, 3], 2))
        H, W, ph, pw = (int(v) for v in rng.integers([1, 1, 0, 0], [13, 13, 5, 5]))
        padding = (ph, pw)
        if (sh, sw) == (1, 1) and rng.random() < 0.5:  # uneven where a dilated extent is odd
            padding, (ph, pw) = "same", (dh * (R - 1) // 2, dw * (S - 1) // 2)
        if H + 2 * ph > dh * (R - 1) and W + 2 * pw > dw * (S - 1):
            return ((int(rng.integers(1, 3)), C, H, W), (K, C // G, R, S),
                    dict(stride=(sh, sw), padding=padding, dilation=(dh, dw), groups=G))


def test_random_geometries_match_torch(torch, rng):
    """200 random geometries in float64: whichever way each pass is computed (dx as
    the forward pass over dy, or tap by tap), it is torch's result."""
    for _ in range(200):
        xs, ws, kw = _random_geometry(rng)
        x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
        y = F.conv2d(x, w, b, **kw)
        dy = rng.standard_normal(y.shape)
        ty, tdx, tdw, tdb = _torch_conv(torch, x, w, b, dy, kw)
        dx, dw, db = F.conv2d_backward(dy, x, w, **kw)
        for got, want in ((y, ty), (dx, tdx), (dw, tdw), (db, tdb)):
            close(got, want, numpy.float64, scale=100)


def test_no_bias_and_skipping_dx(rng):
    x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    y = F.conv2d(x, w)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = F.conv2d_backward(dy, x, w)
    dx2, dw2, db2 = F.conv2d_backward(dy, x, w, need_input_grad=False)
    assert dx2 is None and numpy.array_equal(dw, dw2) and numpy.array_equal(db, db2)


@pytest.mark.parametrize("name", [n for n in gradcheck.cases(numpy.random.default_rng(0))
                                  if n.startswith("conv2d")])
def test_finite_differences(name, rng):
    inputs, fwd, bwd = gradcheck.cases(rng)[name]
    assert gradcheck.check(inputs, fwd, bwd, rng) < gradcheck.TOLERANCE


def test_finite_differences_large_directional(rng):
    kw = dict(stride=2, padding=2, dilation=2, groups=2)
    inputs = dict(x=rng.standard_normal((3, 4, 15, 13)), weight=rng.standard_normal((6, 2, 3, 3)),
                  bias=rng.standard_normal(6))

    def bwd(G, x, weight, bias):
        dx, dw, db = F.conv2d_backward(G, x, weight, **kw)
        return dict(x=dx, weight=dw, bias=db)
    err = gradcheck.check(inputs, lambda **a: F.conv2d(**a, **kw), bwd, rng, elementwise_limit=0)
    assert err < gradcheck.TOLERANCE


def test_gradcheck_catches_a_wrong_gradient(rng):
    inputs, fwd, bwd = gradcheck.cases(rng)["conv2d stride 2 pad 1"]

    def off_by_a_bit(G, **a):
        grads = bwd(G, **a)
        grads["weight"] = grads["weight"] * (1 + 1e-3)
        return grads
    assert gradcheck.check(inputs, fwd, off_by_a_bit, rng) > 1e-4


X = numpy.zeros((2, 4, 8, 8))
Wt = numpy.zeros((6, 2, 3, 3))


@pytest.mark.parametrize("args, kw, exc, words", [
    ((X[0], Wt), {}, ValueError, "input must be 4-D"),
    ((X, Wt[0]), {}, ValueError, "weight must be 4-D"),
    ((X, Wt), {}, ValueError, "input channels"),
    ((X, Wt), dict(groups=3), ValueError, "groups=3 must divide"),
    ((X, Wt), dict(groups=0), ValueError, "groups must be a positive int"),
    ((X, Wt), dict(groups=2, stride=0), ValueError, "stride must be positive"),
    ((X, Wt), dict(groups=2, dilation=(1, -1)), ValueError, "dilation must be positive"),
    ((X, Wt), dict(groups=2, padding=-1), ValueError, "padding must be >= 0"),
    ((X, Wt), dict(groups=2, padding="same", stride=2), ValueError, "'same' needs stride 1"),
    ((X, Wt), dict(groups=2, padding="full"), ValueError, "padding must be"),
    ((X, Wt), dict(groups=2, dilation=5), ValueError, "output height size"),
    ((X.astype(numpy.int64), Wt), dict(groups=2), TypeError, "input must be float32 or float64"),
    ((X.astype(numpy.float16), Wt), dict(groups=2), TypeError, "got dtype float16"),
    ((X.astype(numpy.float32), Wt), dict(groups=2), TypeError, "weight has dtype float64"),
    ((X, Wt, numpy.zeros(5)), dict(groups=2), ValueError, "bias must have shape (6,)"),
    (([[1.0]], Wt), {}, TypeError, "input must be an array"),
])
def test_bad_arguments(args, kw, exc, words):
    with pytest.raises(exc) as info:
        F.conv2d(*args, **kw)
    assert words in str(info.value)


def test_backward_checks_grad_shape():
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 6, 6, 6\)"):
        F.conv2d_backward(numpy.zeros((2, 6, 5, 5)), X, Wt, groups=2)
