"""Learning-rate schedules against torch.optim.lr_scheduler, and their state."""
import numpy
import pytest

import gpucnn
from gpucnn import schedules
from gpucnn.nn import Parameter


def _opt(lr=0.1):
    return gpucnn.SGD([Parameter(numpy.zeros(3))], lr=lr, momentum=0.9)


def _torch_lrs(torch, make, steps, lr=0.1):
    opt = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=lr, momentum=0.9)
    sched = make(opt)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def _ours(sched, steps):
    lrs = [sched.optimizer.lr]
    for _ in range(steps):
        sched.optimizer.step()
        lrs.append(sched.step())
    return lrs


@pytest.mark.parametrize("step_size, gamma", [(1, 0.5), (3, 0.1), (4, 0.9)])
def test_step_lr(torch, step_size, gamma):
    theirs = _torch_lrs(torch, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, gamma),
                        12)
    ours = _ours(schedules.StepLR(_opt(), step_size, gamma), 12)
    numpy.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("T_max, eta_min", [(10, 0.0), (7, 0.01), (1, 0.0)])
def test_cosine(torch, T_max, eta_min):
    make = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max, eta_min)  # noqa
    theirs = _torch_lrs(torch, make, 2 * T_max + 3)
    ours = _ours(schedules.CosineAnnealingLR(_opt(), T_max, eta_min), 2 * T_max + 3)
    numpy.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_warmup_is_torch_linear_lr_then_the_schedule(torch):
    lr_sched = torch.optim.lr_scheduler

    def make(o):
        return lr_sched.SequentialLR(o, [lr_sched.LinearLR(o, 0.25, total_iters=4),
                                         lr_sched.CosineAnnealingLR(o, 10)], milestones=[4])
    theirs = _torch_lrs(torch, make, 16)
    ours = _ours(schedules.CosineAnnealingLR(_opt(), 10, warmup_steps=4,
                                             warmup_start_factor=0.25), 16)
    numpy.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_state_dict_resumes_exactly():
    a = schedules.CosineAnnealingLR(_opt(), 20, 0.001, warmup_steps=3)
    for _ in range(7):
        a.step()
    state = a.state_dict()
    b = schedules.CosineAnnealingLR(_opt(lr=5.0), 20, 0.001, warmup_steps=3)
    b.load_state_dict(state)
    assert b.optimizer.lr == a.optimizer.lr
    assert [a.step() for _ in range(5)] == [b.step() for _ in range(5)]
    with pytest.raises(ValueError, match="schedule state is for 'CosineAnnealingLR', this "
                                         "schedule is StepLR"):
        schedules.StepLR(_opt(), 2).load_state_dict(state)


def test_errors():
    with pytest.raises(ValueError, match="step_size must be a positive int, got 0"):
        schedules.StepLR(_opt(), 0)
    with pytest.raises(ValueError, match="T_max must be a positive int"):
        schedules.CosineAnnealingLR(_opt(), 2.5)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        schedules.StepLR(_opt(), 2, warmup_steps=-1)
    with pytest.raises(TypeError, match="optimizer must be a gpucnn optimizer"):
        schedules.StepLR(object(), 2)
