"""SGD and Adam with PyTorch's update rules (torch.optim, single-tensor form).

SGD:  g = grad + wd*w;  buf = g (first step) or momentum*buf + g;
      g = g + momentum*buf (Nesterov) or buf;  w -= lr*g
Adam: g = grad + wd*w;  m += (1-b1)(g - m);  v = b2*v + (1-b2)g^2;
      w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
"""
import math
import numbers

from . import backend
from .nn.module import Parameter


def _number(value, name, low=0.0, high=None, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return float(value)


class Optimizer:
    def __init__(self, params, lr):
        params = list(params)
        if not params:
            raise ValueError("params is empty: the optimizer got no parameters to update")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}] must be a gpucnn Parameter, got {type(p).__name__}")
        self.params = params
        self.lr = _number(lr, "lr")
        self.state = [dict() for _ in params]
        self.steps = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _checked(self):
        """(index, param) pairs to update; every gradient is checked before any change."""
        todo = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape or p.grad.dtype != p.data.dtype:
                raise ValueError(f"params[{i}].grad has shape {tuple(p.grad.shape)} and dtype "
                                 f"{p.grad.dtype}; the parameter has {tuple(p.data.shape)} and "
                                 f"{p.data.dtype}")
            backend.get_array_module(p.data, p.grad)
            todo.append((i, p))
        return todo

    def step(self):
        todo = self._checked()
        self.steps += 1
        for i, p in todo:
            self._update(p, self.state[i])

    def state_dict(self):
        """Hyper-parameters and per-parameter buffers (arrays on their device)."""
        return {"steps": self.steps, "hyper": self._hyper(), "state": self.state}

    def load_state_dict(self, sd):
        if len(sd["state"]) != len(self.params):
            raise ValueError(f"optimizer state has {len(sd['state'])} parameters, this optimizer "
                             f"has {len(self.params)}")
        for i, (st, p) in enumerate(zip(sd["state"], self.params)):
            for k, v in st.items():
                if hasattr(v, "shape") and tuple(v.shape) != tuple(p.data.shape):
                    raise ValueError(f"optimizer state {k!r} of params[{i}] has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(p.data.shape)}")
        self.steps = int(sd["steps"])
        self.state = []
        for st, p in zip(sd["state"], self.params):
            device = backend.device_of(p.data)
            self.state.append({k: backend.to_device(v, device).astype(p.data.dtype)
                               if hasattr(v, "shape") else v for k, v in st.items()})
        for k, v in sd["hyper"].items():
            setattr(self, k, v)


class SGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        super().__init__(params, lr)
        self.momentum = _number(momentum, "momentum")
        self.weight_decay = _number(weight_decay, "weight_decay")
        self.dampening = _number(dampening, "dampening")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0, got "
                             f"momentum={momentum}, dampening={dampening}")

    def _hyper(self):
        return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                    dampening=self.dampening, nesterov=self.nesterov)

    def _update(self, p, state):
        g = p.grad
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g


class Adam(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        self.betas = (_number(betas[0], "betas[0]", 0.0, 1.0, True),
                      _number(betas[1], "betas[1]", 0.0, 1.0, True))
        self.eps = _number(eps, "eps")
        self.weight_decay = _number(weight_decay, "weight_decay")

    def _hyper(self):
        return dict(lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                    weight_decay=self.weight_decay)

    def _update(self, p, state):
        b1, b2 = self.betas
        g = p.grad
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if "exp_avg" not in state:
            xp = backend.get_array_module(p.data)
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
            state["step"] = 0
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m += (1 - b1) * (g - m)
        v *= b2
        v += (1 - b2) * g * g
        denom = (v ** 0.5) / math.sqrt(1 - b2 ** t) + self.eps
        p.data -= (self.lr / (1 - b1 ** t)) * (m / denom)
