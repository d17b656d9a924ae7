"""Learning-rate schedules with PyTorch's formulas; each sets optimizer.lr.

With t the number of .step() calls so far (PyTorch's last_epoch) and base the
optimizer's lr when the schedule was made:

    StepLR:             lr(t) = base * gamma ** (t // step_size)
    CosineAnnealingLR:  lr(t) = eta_min + (base - eta_min) * (1 + cos(pi * t / T_max)) / 2
                        (PyTorch's closed form; for t > T_max it keeps following the cosine)

warmup_steps=W > 0 puts a linear warmup in front, as torch's
SequentialLR([LinearLR(start_factor=f, total_iters=W), schedule], milestones=[W]):
    t < W:   lr(t) = base * (f + (1 - f) * t / W)
    t >= W:  the schedule at t - W.

A schedule is stepped after optimizer.step(), per epoch or per batch as the
caller chooses; state_dict()/load_state_dict() hold everything a resume needs.
"""
import math

from . import validate
from .optim import hyper_number


class Schedule:
    """Base: subclasses give _main(t) (the lr t steps after the warmup)."""

    def __init__(self, optimizer, warmup_steps=0, warmup_start_factor=1 / 3):
        if not hasattr(optimizer, "lr"):
            raise TypeError(f"optimizer must be a gpucnn optimizer (with .lr), got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.warmup_steps = validate.integer(warmup_steps, "warmup_steps", 0)
        self.warmup_start_factor = hyper_number(warmup_start_factor, "warmup_start_factor",
                                                0.0, 1.0)
        if self.warmup_steps and self.warmup_start_factor == 0:
            raise ValueError("warmup_start_factor must be > 0 (PyTorch's LinearLR rule), got 0")
        self.last_step = 0
        self.optimizer.lr = self.lr_at(0)

    def lr_at(self, t):
        W = self.warmup_steps
        if t < W:
            f = self.warmup_start_factor
            return self.base_lr * (f + (1 - f) * t / W)
        return self._main(t - W)

    def step(self):
        """Advance one step (epoch or batch) and set the optimizer's lr."""
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)
        return self.optimizer.lr

    def get_last_lr(self):
        return self.lr_at(self.last_step)

    def state_dict(self):
        """JSON-serialisable: the type, its settings and the step count."""
        return dict(type=type(self).__name__, last_step=self.last_step, base_lr=self.base_lr,
                    warmup_steps=self.warmup_steps,
                    warmup_start_factor=self.warmup_start_factor, **self._settings())

    def load_state_dict(self, state):
        if state.get("type") != type(self).__name__:
            raise ValueError(f"schedule state is for {state.get('type')!r}, this schedule is "
                             f"{type(self).__name__}")
        self.base_lr = float(state["base_lr"])
        self.warmup_steps = int(state["warmup_steps"])
        self.warmup_start_factor = float(state["warmup_start_factor"])
        for k in self._settings():
            setattr(self, k, state[k])
        self.last_step = int(state["last_step"])
        self.optimizer.lr = self.lr_at(self.last_step)

    def __repr__(self):
        items = dict(self._settings(), warmup_steps=self.warmup_steps)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in items.items())})"


class StepLR(Schedule):
    """lr = base * gamma ** (t // step_size), torch.optim.lr_scheduler.StepLR."""

    def __init__(self, optimizer, step_size, gamma=0.1, **warmup):
        self.step_size = validate.positive_int(step_size, "step_size")
        self.gamma = hyper_number(gamma, "gamma")
        super().__init__(optimizer, **warmup)

    def _settings(self):
        return dict(step_size=self.step_size, gamma=self.gamma)

    def _main(self, t):
        return self.base_lr * self.gamma ** (t // self.step_size)


class CosineAnnealingLR(Schedule):
    """lr = eta_min + (base - eta_min)(1 + cos(pi t / T_max)) / 2, torch's CosineAnnealingLR."""

    def __init__(self, optimizer, T_max, eta_min=0.0, **warmup):
        self.T_max = validate.positive_int(T_max, "T_max")
        self.eta_min = hyper_number(eta_min, "eta_min")
        super().__init__(optimizer, **warmup)

    def _settings(self):
        return dict(T_max=self.T_max, eta_min=self.eta_min)

    def _main(self, t):
        return self.eta_min + (self.base_lr - self.eta_min) * (
            1 + math.cos(math.pi * t / self.T_max)) / 2


SCHEDULES = {"step": StepLR, "cosine": CosineAnnealingLR}
