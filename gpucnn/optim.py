"""SGD and Adam with PyTorch's update rules (torch.optim, single-tensor form).

SGD:  g = grad + wd*w;  buf = g (first step) or momentum*buf + g;
      g = g + momentum*buf (Nesterov) or buf;  w -= lr*g
Adam: g = grad + wd*w;  m += (1-b1)(g - m);  v = b2*v + (1-b2)g^2;
      w -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)

What changes from step to step is read from the device, as PyTorch's
``capturable`` optimizers do, so that a step captured into a CUDA graph
(gpucnn.backends.cuda.graph) stays right when replayed: the update reads the learning rate from
a 0-d array on the parameters' device (``optimizer.lr = x`` fills it in place: no
sync), and Adam counts each parameter's steps t in a device vector and computes
its bias corrections there. The same code runs on NumPy. The numbers are those of
a Python-float lr: the 0-d array has the parameter's dtype, which is what NumPy and
CuPy round a Python float to in ``lr * g`` (NEP 50), and Adam's corrections are
computed in float64, as Python computed them, then rounded the same way.
"""
import numpy

from . import backend, validate
from .nn.module import Parameter


def hyper_number(value, name, low=0.0, high=None, high_open=False):
    """A hyper-parameter (lr, momentum, a beta, ...) as a float: TypeError where it is
    not a finite number, ValueError where it lies outside [low, high] (high excluded
    where high_open). Shared with gpucnn.schedules."""
    validate.number(value, name, error=TypeError)
    return validate.number(value, name, low, high, high_open=high_open)


class Optimizer:
    # True where a step reads every value that changes between steps (lr, step counts)
    # from device arrays, so that a CUDA graph of it stays right when replayed
    capturable = False

    def __init__(self, params, lr):
        params = list(params)
        if not params:
            raise ValueError("params is empty: the optimizer got no parameters to update")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}] must be a gpucnn Parameter, got {type(p).__name__}")
        self.params = params
        self._lr_arrays = {}  # (array module, dtype) -> the 0-d array the update reads
        self.lr = lr
        self.state = [dict() for _ in params]
        self.steps = 0

    @property
    def lr(self):
        """The learning rate, a Python float. Setting it (a schedule does, every batch)
        also fills the device copies the update reads, in place: no host sync, and a
        captured CUDA graph reads the new value at its next replay."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = hyper_number(value, "lr")
        for a in self._lr_arrays.values():
            a.fill(self._lr)

    def _lr_like(self, data, dtype=None):
        """lr as a 0-d array on data's device, in data's dtype (or dtype), made once."""
        # keyed by device name, not array module: an optimizer stays picklable
        key = (backend.device_of(data), numpy.dtype(dtype or data.dtype).str)
        a = self._lr_arrays.get(key)
        if a is None:
            xp = backend.get_array_module(data)
            a = self._lr_arrays[key] = xp.full((), self._lr, dtype=key[1])
        return a

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
        if todo:
            self._step(todo)

    def _step(self, todo):
        for i, p in todo:
            self._update(p, self.state[i])

    def state_dict(self):
        """Hyper-parameters (plain numbers: lr as a float) and per-parameter buffers
        (arrays on their device)."""
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
        state = []
        for old, st, p in zip(self.state, sd["state"], self.params):
            device, new = backend.device_of(p.data), {}
            for k, v in st.items():
                if not hasattr(v, "shape"):
                    new[k] = v
                elif k in old and backend.device_of(old[k]) == device:
                    old[k][...] = backend.to_device(v, device)  # in place, as a captured
                    new[k] = old[k]                              # CUDA graph holds old[k]
                else:
                    new[k] = backend.to_device(v, device).astype(p.data.dtype)
            state.append(new)
        self.state = state
        for k, v in sd["hyper"].items():
            setattr(self, k, v)


class SGD(Optimizer):
    capturable = True

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, dampening=0.0):
        super().__init__(params, lr)
        self.momentum = hyper_number(momentum, "momentum")
        self.weight_decay = hyper_number(weight_decay, "weight_decay")
        self.dampening = hyper_number(dampening, "dampening")
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
        p.data -= self._lr_like(p.data) * g


class Adam(Optimizer):
    capturable = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        self.betas = (hyper_number(betas[0], "betas[0]", 0.0, 1.0, True),
                      hyper_number(betas[1], "betas[1]", 0.0, 1.0, True))
        self.eps = hyper_number(eps, "eps")
        self.weight_decay = hyper_number(weight_decay, "weight_decay")
        # each parameter's step count t (float64: exact to 2**53), on the device once stepped
        self._counts = numpy.zeros(len(self.params))

    def _hyper(self):
        return dict(lr=self.lr, betas=tuple(self.betas), eps=self.eps,
                    weight_decay=self.weight_decay)

    def _step(self, todo):
        """Count the steps of the parameters in todo and compute their bias corrections
        on their device (float64, vector ops for all of them at once), then update each."""
        first = todo[0][1].data
        devices = {backend.device_of(p.data) for _, p in todo}
        if len(devices) > 1:
            raise ValueError("Adam needs all its parameters on one device (it counts their "
                             f"steps there), got parameters on {' and '.join(sorted(devices))}; "
                             "move the model with .to(device) first")
        xp = backend.get_array_module(first)
        if backend.get_array_module(self._counts) is not xp:  # first step, or a new device
            self._counts = backend.to_device(self._counts, backend.device_of(first))
        t = self._counts
        if len(todo) == len(self.params):
            t += 1
        else:  # parameters without a gradient keep their count, as in PyTorch
            for i, _ in todo:
                t[i:i + 1] += 1
        b1, b2 = self.betas
        t = xp.maximum(t, 1)  # a parameter never stepped (t = 0) gets unused, finite values
        step_size = self._lr_like(t, numpy.float64) / (1 - b1 ** t)
        bc2_sqrt = xp.sqrt(1 - b2 ** t)
        corrections = {}  # dtype -> both, rounded to it once
        for i, p in todo:
            dtype = p.data.dtype
            if dtype not in corrections:
                corrections[dtype] = (step_size.astype(dtype, copy=False),
                                      bc2_sqrt.astype(dtype, copy=False))
            self._update(p, self.state[i], *(c[i] for c in corrections[dtype]))

    def _update(self, p, state, step_size, bc2_sqrt):
        b1, b2 = self.betas
        g = p.grad
        if self.weight_decay:
            g = g + self.weight_decay * p.data
        if "exp_avg" not in state:
            xp = backend.get_array_module(p.data)
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m += (1 - b1) * (g - m)
        v *= b2
        v += (1 - b2) * g * g
        denom = (v ** 0.5) / bc2_sqrt + self.eps
        p.data -= step_size * (m / denom)

    def state_dict(self):
        """As the base's, with each updated parameter's step count t as a plain int in
        its state (PyTorch's state['step']): one read of the device counts."""
        sd = super().state_dict()
        counts = backend.to_numpy(self._counts)
        sd["state"] = [dict(st, step=int(counts[i])) if "exp_avg" in st else dict(st)
                       for i, st in enumerate(sd["state"])]
        return sd

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        counts = numpy.zeros(len(self.params))
        for i, st in enumerate(self.state):
            counts[i] = int(st.pop("step", 0))
        if backend.device_of(self._counts) != "cpu":
            self._counts[...] = backend.to_device(counts, "cuda")  # in place: see above
        else:
            self._counts = counts  # moved to the parameters' device by the next step
