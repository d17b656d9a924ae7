"""Float64 finite-difference checks of every layer's backward pass.

For an op y = f(inputs) and a random upstream gradient G, the scalar
L = sum(y * G) has dL/dinput = the op's backward(G). The check compares that
with central differences (L(a + eps) - L(a - eps)) / (2 eps): element by
element on tiny shapes, along random directions on larger ones. Inputs are
kept away from kinks and ties (ReLU at 0, equal maxima) where the check needs it.
Used by ``gpucnn gradcheck`` and by the tests.
"""
import numpy

from .. import backend
from .. import functional as F

EPS = 1e-6
TOLERANCE = 1e-6  # relative to the largest gradient entry; float64 only


def _spread(rng, shape, gap=0.05):
    """Distinct values at least `gap` apart (no ties, no zeros), shuffled."""
    n = int(numpy.prod(shape))
    v = (numpy.arange(n) - n / 2 + 0.5) * gap
    return rng.permutation(v).reshape(shape)


def cases(rng, xp=numpy):
    """name -> (inputs, forward(**inputs) -> y, backward(G, **inputs) -> {name: grad}).
    Constant arguments (the labels) live in xp, the device's array module."""
    def conv(kw, N=2, C=4, H=7, W=6, K=4, R=3, S=2):
        g = kw.get("groups", 1)
        inputs = dict(x=rng.standard_normal((N, C, H, W)),
                      weight=rng.standard_normal((K, C // g, R, S)), bias=rng.standard_normal(K))
        fwd = lambda x, weight, bias: F.conv2d(x, weight, bias, **kw)

        def bwd(G, x, weight, bias):
            dx, dw, db = F.conv2d_backward(G, x, weight, **kw)
            return dict(x=dx, weight=dw, bias=db)
        return inputs, fwd, bwd

    def pool(kind, kw):
        inputs = dict(x=_spread(rng, (2, 3, 7, 6)))
        if kind == "max":
            fwd = lambda x: F.max_pool2d(x, **kw)[0]
            bwd = lambda G, x: dict(x=F.max_pool2d_backward(G, F.max_pool2d(x, **kw)[1],
                                                            x.shape, **kw))
        else:
            fwd = lambda x: F.avg_pool2d(x, **kw)
            bwd = lambda G, x: dict(x=F.avg_pool2d_backward(G, x.shape, **kw))
        return inputs, fwd, bwd

    def linear():
        inputs = dict(x=rng.standard_normal((3, 5)), weight=rng.standard_normal((4, 5)),
                      bias=rng.standard_normal(4))

        def bwd(G, x, weight, bias):
            dx, dw, db = F.linear_backward(G, x, weight)
            return dict(x=dx, weight=dw, bias=db)
        return inputs, F.linear, bwd

    labels = xp.asarray(numpy.array([0, 3, 1, 3]))

    def loss():
        inputs = dict(logits=rng.standard_normal((4, 5)) * 3)
        return (inputs, lambda logits: F.softmax_cross_entropy(logits, labels)[0],
                lambda G, logits: dict(logits=F.softmax_cross_entropy(logits, labels)[1] * G))

    def batch_norm(training):
        stats = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
        inputs = dict(x=rng.standard_normal((3, 3, 4, 2)), weight=rng.standard_normal(3),
                      bias=rng.standard_normal(3))

        def fwd(x, weight, bias):  # fresh copies: training updates the running statistics
            xp = backend.get_array_module(x)
            rm, rv = (xp.asarray(s) for s in stats)
            return F.batch_norm(x, rm, rv, weight, bias, training=training)

        def bwd(G, x, weight, bias):
            dx, dw, db = F.batch_norm_backward(G, fwd(x, weight, bias)[1], weight)
            return dict(x=dx, weight=dw, bias=db)
        return inputs, lambda **a: fwd(**a)[0], bwd

    def smoothed_loss():
        inputs = dict(logits=rng.standard_normal((4, 5)) * 3)
        loss = lambda z: F.softmax_cross_entropy(z, labels, label_smoothing=0.2)  # noqa: E731
        return inputs, lambda logits: loss(logits)[0], lambda G, logits: dict(
            logits=loss(logits)[1] * G)

    return {
        "conv2d": conv({}),
        "conv2d stride 2 pad 1": conv(dict(stride=2, padding=1)),
        "conv2d dilation 2 groups 2": conv(dict(dilation=2, groups=2, padding=(1, 2))),
        "conv2d depthwise 'same'": conv(dict(groups=4, padding="same"), K=8),
        "conv2d stride (3,2) 'valid'": conv(dict(stride=(3, 2), padding="valid")),
        "max_pool2d 2x2": pool("max", dict(kernel_size=2)),
        "max_pool2d 3x3 s2 p1 ceil": pool("max", dict(kernel_size=3, stride=2, padding=1,
                                                     ceil_mode=True)),
        "avg_pool2d 2x2": pool("avg", dict(kernel_size=2)),
        "avg_pool2d 3x2 s2 p1 ceil": pool("avg", dict(kernel_size=(3, 2), stride=2, padding=1,
                                                     ceil_mode=True)),
        "relu": (dict(x=_spread(rng, (2, 3, 4))), F.relu,
                 lambda G, x: dict(x=F.relu_backward(G, x))),
        "linear": linear(),
        "softmax_cross_entropy": loss(),
        "batch_norm train": batch_norm(True),
        "batch_norm eval": batch_norm(False),
        "global_avg_pool2d": (dict(x=rng.standard_normal((2, 3, 4, 3))), F.global_avg_pool2d,
                              lambda G, x: dict(x=F.global_avg_pool2d_backward(G, x.shape))),
        "softmax_cross_entropy smoothing 0.2": smoothed_loss(),
    }


def _scalar(y, G):
    return float((y * G).sum())


def check(inputs, forward, backward, rng, xp=numpy, elementwise_limit=200, directions=6):
    """Largest relative error between backward() and finite differences, over all inputs."""
    inputs = {k: xp.asarray(v, dtype=xp.float64) for k, v in inputs.items()}
    y = forward(**inputs)
    G = xp.asarray(rng.standard_normal(numpy.shape(y))) if numpy.ndim(y) else 1.0
    grads = backward(G, **inputs)
    worst = 0.0
    for name, a in inputs.items():
        analytic = backend.to_numpy(grads[name])

        def L(value, name=name):
            return _scalar(forward(**{**inputs, name: value}), G)
        scale = max(float(numpy.abs(analytic).max()), 1e-3)
        if a.size <= elementwise_limit:
            numeric = numpy.zeros(a.shape)
            for i in numpy.ndindex(*a.shape):  # tiny shapes only: a test, not a hot path
                e = xp.zeros_like(a)
                e[i] = EPS
                numeric[i] = (L(a + e) - L(a - e)) / (2 * EPS)
            worst = max(worst, float(numpy.abs(numeric - analytic).max()) / scale)
        else:
            for _ in range(directions):
                v = xp.asarray(rng.standard_normal(a.shape))
                numeric = (L(a + EPS * v) - L(a - EPS * v)) / (2 * EPS)
                exact = float((analytic * backend.to_numpy(v)).sum())
                worst = max(worst, abs(numeric - exact) / max(abs(exact), scale))
    return worst


def run_all(device="cpu", seed=0):
    """[(case name, largest relative error, passed)] for every case on a device."""
    xp = backend.xp_for(device)
    rng = numpy.random.default_rng(seed)
    rows = []
    for name, (inputs, fwd, bwd) in cases(rng, xp).items():
        err = check(inputs, fwd, bwd, rng, xp=xp)
        rows.append((name, err, err < TOLERANCE))
    return rows
