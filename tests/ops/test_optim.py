import copy
import pickle
import warnings

import numpy
import pytest

from gpucnn import SGD, Adam, Parameter


def _run(torch, make_ours, make_theirs, steps=5, seed=0):
    rng = numpy.random.default_rng(seed)
    w0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(steps)]
    p = Parameter(w0.copy())
    tp = torch.nn.Parameter(torch.tensor(w0.copy()))
    ours, theirs = make_ours([p]), make_theirs([tp])
    for g in grads:
        p.grad = g.copy()
        tp.grad = torch.tensor(g)
        ours.step()
        theirs.step()
    numpy.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.1, momentum=0.9),
                                dict(lr=0.05, momentum=0.9, nesterov=True),
                                dict(lr=0.1, momentum=0.5, weight_decay=1e-2),
                                dict(lr=0.1, momentum=0.5, dampening=0.3)])
def test_sgd_matches_torch(torch, kw):
    _run(torch, lambda ps: SGD(ps, **kw), lambda ps: torch.optim.SGD(ps, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
                                dict(lr=0.01, weight_decay=0.1)])
def test_adam_matches_torch(torch, kw):
    _run(torch, lambda ps: Adam(ps, **kw), lambda ps: torch.optim.Adam(ps, **kw))


def test_bad_arguments_and_no_half_update():
    p = Parameter(numpy.zeros(3))
    with pytest.raises(ValueError, match=r"lr must be a number >= 0.0, got -1"):
        SGD([p], lr=-1)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must be a number in \[0.0, 1.0\), got 1.0"):
        Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="params is empty"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\] must be a gpucnn Parameter"):
        SGD([numpy.zeros(3)], lr=0.1)
    a, b = Parameter(numpy.zeros(3)), Parameter(numpy.zeros(2))
    a.grad, b.grad = numpy.ones(3), numpy.ones(3)
    opt = SGD([a, b], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[1\].grad has shape \(3,\)"):
        opt.step()
    assert not a.data.any() and opt.steps == 0


def test_state_dict_round_trip():
    p = Parameter(numpy.ones(3))
    opt = Adam([p], lr=0.1)
    p.grad = numpy.ones(3)
    opt.step()
    q = Parameter(p.data.copy())
    opt2 = Adam([q], lr=0.5)
    opt2.load_state_dict(opt.state_dict())
    for o, param in ((opt, p), (opt2, q)):
        param.grad = numpy.full(3, 0.5)
        o.step()
    numpy.testing.assert_array_equal(p.data, q.data)


def test_adam_counts_steps_per_parameter_as_torch(torch):
    """A parameter without a gradient keeps its step count t (bias corrections per
    parameter), now counted on the parameters' device."""
    rng = numpy.random.default_rng(1)
    w = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    ours = [Parameter(a.copy()) for a in w]
    theirs = [torch.nn.Parameter(torch.tensor(a.copy())) for a in w]
    opt, ref = Adam(ours, lr=0.01), torch.optim.Adam(theirs, lr=0.01)
    for k in range(6):
        for p, tp in zip(ours, theirs):
            g = rng.standard_normal(p.data.shape)
            p.grad, tp.grad = g.copy(), torch.tensor(g)
        if k in (1, 2):
            ours[1].grad = theirs[1].grad = None
        opt.step()
        ref.step()
    for p, tp in zip(ours, theirs):
        numpy.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)
    assert [st["step"] for st in opt.state_dict()["state"]] == [6, 4]


def test_lr_is_a_float_and_setting_it_is_checked():
    p = Parameter(numpy.ones(3, numpy.float32))
    opt = SGD([p], lr=0.1)
    p.grad = numpy.ones(3, numpy.float32)
    opt.step()
    opt.lr = 0.25  # the device copy the update reads follows
    assert type(opt.lr) is float and opt.state_dict()["hyper"]["lr"] == 0.25
    opt.step()
    assert (p.data == numpy.float32(1) - numpy.float32(0.1) - numpy.float32(0.25)).all()
    with pytest.raises(ValueError, match=r"lr must be a number >= 0.0, got -0.1"):
        opt.lr = -0.1
    with pytest.raises(TypeError, match="lr must be a finite number, got nan"):
        opt.lr = float("nan")
    assert opt.lr == 0.25


def test_adam_loads_a_state_dict_of_plain_numbers():
    """The format checkpoints have always held: per-parameter 'step' ints."""
    p, q = Parameter(numpy.ones(3)), Parameter(numpy.ones(3))
    opt = Adam([p], lr=0.1)
    for _ in range(3):
        p.grad = numpy.full(3, 0.5)
        opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 3 and type(sd["hyper"]["lr"]) is float
    q.data = p.data.copy()
    old = dict(steps=3, hyper=dict(lr=0.1, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0),
               state=[dict(step=3, exp_avg=sd["state"][0]["exp_avg"].copy(),
                           exp_avg_sq=sd["state"][0]["exp_avg_sq"].copy())])
    opt2 = Adam([q], lr=0.5)
    opt2.load_state_dict(old)
    for o, param in ((opt, p), (opt2, q)):
        param.grad = numpy.full(3, 0.25)
        o.step()
    numpy.testing.assert_array_equal(p.data, q.data)
    assert opt2.state_dict()["state"][0]["step"] == 4


def test_a_parameter_never_stepped_raises_no_warning():
    """Adam's bias corrections for t = 0 would divide by zero (a warning, an error
    under -W error); they are never used, and are computed finite."""
    p, q = Parameter(numpy.ones(3)), Parameter(numpy.ones(2))
    opt = Adam([p, q], lr=0.0)
    p.grad = numpy.full(3, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert (q.data == 1).all() and opt.state_dict()["state"][1] == {}


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_an_optimizer_that_has_stepped_can_be_copied_and_pickled(cls):
    p = Parameter(numpy.ones(3, numpy.float32))
    opt = cls([p], lr=0.1)
    p.grad = numpy.ones(3, numpy.float32)
    opt.step()
    clone = pickle.loads(pickle.dumps(opt))
    twin = copy.deepcopy(opt)
    for o in (opt, clone, twin):
        o.params[0].grad = numpy.ones(3, numpy.float32)
        o.lr = 0.05
        o.step()
    assert (clone.params[0].data == p.data).all() and (twin.params[0].data == p.data).all()


def test_adam_with_parameters_on_two_devices_says_so_standin(standin):
    p, q = Parameter(numpy.ones(3)), Parameter(standin.asarray(numpy.ones(3)))
    opt = Adam([p, q], lr=0.1)
    p.grad, q.grad = numpy.ones(3), standin.ones(3)
    with pytest.raises(ValueError, match="Adam needs all its parameters on one device.*"
                                         "cpu and cuda.*to\\(device\\)"):
        opt.step()
