"""CUDA-graph replay (gpucnn.backends.cuda.graph) of the full recipe on the CuPy stand-in: SGD with
a schedule and warmup, Adam (with weight decay), label smoothing, augmentation.

The stand-in's capture records nothing, so a "replay" runs the step again on the
static buffers; what these tests pin down is what makes a real replay right: the
graphed path gives the eager path's bits, a step hands the device no host value
that changes from step to step (the values a graph would bake in), no step
synchronises, and a new learning rate needs no new capture."""
import numpy
import pytest

import gpucnn
from conftest import REAL_CUDA_SKIP
from gpucnn import backend, schedules
from gpucnn.app import checkpoint, models, train
from gpucnn.backends.cuda import graph
from gpucnn.augment import Augment
from gpucnn.step import train_step

quiet = lambda *a: None  # noqa: E731

CASES = {
    "sgd-cosine-warmup": dict(optimizer="sgd", schedule=True),
    "adam-cosine": dict(optimizer="adam", schedule=True),
    "adam-weight-decay": dict(optimizer="adam", weight_decay=0.05),
    "label-smoothing": dict(optimizer="sgd", label_smoothing=0.1),
    "augment": dict(optimizer="sgd", augment=True, schedule=True),
}


def _setup(device, optimizer="sgd", weight_decay=0.0, schedule=False, augment=False,
           label_smoothing=0.0, optimizer_class=None):
    gpucnn.manual_seed(0)
    net = models.digits_net().to(device)
    params = net.parameters()
    if optimizer_class is not None:
        opt = optimizer_class(params, lr=0.05)
    elif optimizer == "sgd":
        opt = gpucnn.SGD(params, lr=0.05, momentum=0.9, nesterov=True,
                         weight_decay=weight_decay or 5e-4)
    else:
        opt = gpucnn.Adam(params, lr=1e-2, weight_decay=weight_decay)
    sched = (schedules.CosineAnnealingLR(opt, T_max=6, warmup_steps=2) if schedule else None)
    aug = Augment(padding=2, flip=True, seed=5) if augment else None
    return net, opt, sched, aug, label_smoothing


def _batches(xp, n=7, size=8):
    rng = numpy.random.default_rng(3)
    xs = [xp.asarray(rng.standard_normal((size, 1, 8, 8)).astype(numpy.float32))
          for _ in range(n)]
    ys = [xp.asarray(rng.integers(0, 10, size)) for _ in range(n)]
    return xs + [xs[0][:5]], ys + [ys[0][:5]]  # and a last, partial batch (run eagerly)


def _state(net, opt):
    sd = opt.state_dict()
    return ({k: v.get() for k, v in net.state_dict().items()},
            [{k: v.get() if hasattr(v, "get") else v for k, v in st.items()}
             for st in sd["state"]], sd["steps"], sd["hyper"])


def _assert_same(a, b):
    (wa, sa, na, ha), (wb, sb, nb, hb) = a, b
    for k in wa:
        assert numpy.array_equal(wa[k], wb[k]), k
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            assert numpy.array_equal(x[k], y[k]), k
    assert (na, ha) == (nb, hb)


def _graph_vs_eager(xp, case):
    """GraphedStep (warm-up 2, capture, then replays) and eager steps side by side on
    xp's device, bitwise; returns the GraphedStep."""
    xs, ys = _batches(xp)
    net, opt, sched, aug, smoothing = _setup("cuda", **CASES[case])
    ref_net, ref_opt, ref_sched, ref_aug, _ = _setup("cuda", **CASES[case])
    graphed = graph.GraphedStep(net, opt, step=train_step, label_smoothing=smoothing, warmup=2,
                                log=quiet)
    assert graphed.capture
    lrs = []
    for x, y in zip(xs, ys):
        gx = aug(x) if aug else x
        loss, logits = graphed(gx, y)
        ref_x = ref_aug(x) if ref_aug else x
        ref_loss, ref_logits = train_step(ref_net, ref_opt, ref_x, y,
                                          label_smoothing=smoothing)
        assert numpy.array_equal(loss.get(), ref_loss.get())
        assert numpy.array_equal(logits.get(), ref_logits.get())
        if sched:
            lrs.append(sched.step())
            ref_sched.step()
    assert graphed.graph is not None
    assert graphed.calls == len(xs) - 1  # every full batch went through the static path
    if sched:
        assert len(set(lrs)) == len(lrs)  # the lr changed at every step
    _assert_same(_state(net, opt), _state(ref_net, ref_opt))
    if smoothing:  # the smoothing reached the step: without it the loss differs
        plain, _ = train_step(*_setup("cuda", **CASES[case])[:2], xs[0], ys[0])
        smooth, _ = train_step(*_setup("cuda", **CASES[case])[:2], xs[0], ys[0],
                               label_smoothing=smoothing)
        assert not numpy.array_equal(plain.get(), smooth.get())
    return graphed


@pytest.mark.parametrize("case", CASES)
def test_standin_graph_matches_eager_bitwise(standin, case):
    captures = standin.cuda.Stream.captures
    graphed = _graph_vs_eager(standin, case)
    assert standin.cuda.Stream.captures - captures == 1 and graphed.replays is False


@REAL_CUDA_SKIP
@pytest.mark.parametrize("case", CASES)
def test_cuda_graph_replays_match_eager_bitwise(case):
    """On a real GPU the capture records and every later step is a replay."""
    graphed = _graph_vs_eager(backend.xp_for("cuda"), case)
    assert graphed.replays is True


@pytest.mark.parametrize("case", ["sgd-cosine-warmup", "adam-cosine"])
def test_standin_graph_step_hands_the_device_no_per_step_host_value(standin, case):
    """What a captured graph keeps fixed (scalars, host arrays, kernel arguments) is
    the same at every step, though lr and Adam's step count change between them."""
    xs, ys = _batches(standin)
    net, opt, sched, _, _ = _setup("cuda", **CASES[case])
    train_step(net, opt, xs[0], ys[0])  # the first step creates buffers: never captured
    sched.step()
    steps = []
    for x, y in zip(xs[1:4], ys[1:4]):
        with standin.recording_host_values() as ops:
            train_step(net, opt, x, y)
        steps.append(ops)
        sched.step()
    assert len(steps[0]) > 50 and steps[0] == steps[1] == steps[2]


def test_standin_host_value_recording_sees_a_host_lr(standin):
    """The check above can fail: an update that reads lr as a Python float bakes it in."""
    class HostLR(gpucnn.SGD):
        capturable = False  # what such an optimizer must say, so that no graph is made

        def _update(self, p, state):
            p.data -= self.lr * p.grad
    xs, ys = _batches(standin)
    net, opt, _, _, _ = _setup("cuda", optimizer_class=HostLR)
    recorded = []
    for x, y, lr in zip(xs[:2], ys[:2], (0.05, 0.04)):
        opt.lr = lr
        with standin.recording_host_values() as ops:
            train_step(net, opt, x, y)
        recorded.append(ops)
    assert recorded[0] != recorded[1]
    assert [op for op in recorded[0] if op not in recorded[1]][0][1][0] == 0.05
    lines = []
    assert not graph.GraphedStep(net, opt, step=train_step, log=lines.append).capture
    assert len(lines) == 1 and "HostLR does not read its per-step values" in lines[0]


@pytest.mark.parametrize("case", ["sgd-cosine-warmup", "adam-cosine"])
def test_standin_graph_steps_never_sync_and_capture_once_as_lr_changes(standin, case):
    xs, ys = _batches(standin)
    net, opt, sched, _, _ = _setup("cuda", **CASES[case])
    captures = standin.cuda.Stream.captures
    graphed = graph.GraphedStep(net, opt, step=train_step, warmup=1, log=quiet)
    for x, y in zip(xs[:-1], ys[:-1]):
        with standin.count_syncs() as syncs:
            graphed(x, y)
            sched.step()  # writes the new lr into the device scalar the graph reads
            assert syncs() == 0
    assert standin.cuda.Stream.captures - captures == 1
    assert opt.steps == len(xs) - 1 and sched.last_step == len(xs) - 1


def test_standin_adam_state_dict_holds_plain_numbers_and_resumes_exactly(standin):
    xs, ys = _batches(standin)
    net, opt, sched, _, _ = _setup("cuda", **CASES["adam-cosine"])
    for x, y in zip(xs[:3], ys[:3]):
        train_step(net, opt, x, y)
        sched.step()
    sd = opt.state_dict()
    assert type(sd["hyper"]["lr"]) is float and sd["hyper"]["lr"] == sched.get_last_lr()
    assert [st["step"] for st in sd["state"]] == [3] * len(net.parameters())
    assert all(type(st["step"]) is int for st in sd["state"])
    # a copy loaded from that state takes the same next steps, graphed
    other, other_opt, other_sched, _, _ = _setup("cuda", **CASES["adam-cosine"])
    other.load_state_dict(net.state_dict())
    other_opt.load_state_dict(sd)
    other_sched.load_state_dict(sched.state_dict())
    graphed = graph.GraphedStep(other, other_opt, step=train_step, warmup=1, log=quiet)
    for x, y in zip(xs[3:-1], ys[3:-1]):
        train_step(net, opt, x, y)
        sched.step()
        graphed(x, y)
        other_sched.step()
    _assert_same(_state(net, opt), _state(other, other_opt))


def test_standin_graph_is_on_for_adam(standin):
    net, opt, _, _, _ = _setup("cuda", optimizer="adam")
    lines = []
    graphed = graph.GraphedStep(net, opt, step=train_step, log=lines.append)
    assert graphed.capture and lines == []


def test_standin_graph_warmup_needs_an_eager_step(standin):
    net, opt, _, _, _ = _setup("cuda")
    with pytest.raises(ValueError, match="warmup must be an int >= 1.*got 0"):
        graph.GraphedStep(net, opt, step=train_step, warmup=0)


def test_standin_train_resnet_recipe_with_the_graph(standin, tmp_path):
    """--model resnet's recipe (SGD Nesterov, cosine per batch, weight decay, crop
    augmentation) plus warmup and label smoothing, one epoch on digits: the graph is
    captured once and the weights are the eager run's, bit for bit."""
    kw = dict(dataset="digits", model="resnet", epochs=1, limit=168, batch_size=32,
              warmup=2, label_smoothing=0.1, device="cuda", progress=False)
    captures = standin.cuda.Stream.captures
    lines = []
    train.train(train.Config(out=str(tmp_path / "g"), **kw), log=lines.append)
    assert standin.cuda.Stream.captures - captures == 1
    assert not any("CUDA graph" in line for line in lines), lines
    train.train(train.Config(out=str(tmp_path / "e"), cuda_graph=False, **kw), log=quiet)
    meta, graphed, _ = checkpoint.read(tmp_path / "g/checkpoint.npz")
    _, eager, _ = checkpoint.read(tmp_path / "e/checkpoint.npz")
    assert (meta["config"]["schedule"], meta["config"]["augment"]) == ("cosine", "crop")
    for k in eager:
        assert numpy.array_equal(graphed[k], eager[k]), k


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_standin_loading_state_after_capture_writes_into_the_captured_arrays(standin, optimizer):
    """A captured graph replays with the addresses it captured: load_state_dict
    (model and optimizer) writes into those arrays, as PyTorch's copy_, so the
    replays see the loaded values."""
    xs, ys = _batches(standin)
    source, source_opt, _, _, _ = _setup("cuda", optimizer=optimizer)
    for x, y in zip(xs[:3], ys[:3]):
        train_step(source, source_opt, x, y)
    net, opt, _, _, _ = _setup("cuda", optimizer=optimizer)
    graphed = graph.GraphedStep(net, opt, step=train_step, warmup=1, log=quiet)
    for x, y in zip(xs[:3], ys[:3]):
        graphed(x, y)
    held = ([p.data for p in net.parameters()] + [b.data for _, b in net.named_buffers()]
            + [a for st in opt.state for a in st.values() if hasattr(a, "shape")]
            + ([opt._counts] if optimizer == "adam" else []))
    net.load_state_dict(source.state_dict())
    opt.load_state_dict(source_opt.state_dict())
    now = ([p.data for p in net.parameters()] + [b.data for _, b in net.named_buffers()]
           + [a for st in opt.state for a in st.values() if hasattr(a, "shape")]
           + ([opt._counts] if optimizer == "adam" else []))
    assert len(now) == len(held) and all(a is b for a, b in zip(now, held))
    _assert_same(_state(net, opt), _state(source, source_opt))
    for x, y in zip(xs[3:-1], ys[3:-1]):
        graphed(x, y)
        train_step(source, source_opt, x, y)
    _assert_same(_state(net, opt), _state(source, source_opt))
