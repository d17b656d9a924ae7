"""The layers: each calls a gpucnn.functional forward, keeps its ctx for backward
(Module._keep) and hands it to the matching functional backward (Module._take)."""

from .. import functional as F
from .. import init as initialisers
from .. import random, validate
from .module import Module


class ReLU(Module):
    def forward(self, x):
        y, ctx = F.basic.relu_forward(x)
        self._keep(ctx)
        return y

    def backward(self, dy, need_input_grad=True):
        return F.relu_backward(dy, self._take())


class Flatten(Module):
    """(N, ...) -> (N, prod(...)), torch.nn.Flatten's default."""

    def forward(self, x):
        y, ctx = F.basic.flatten_forward(x)
        self._keep(ctx)
        return y

    def backward(self, dy, need_input_grad=True):
        return F.basic.flatten_backward(dy, self._take())


class Linear(Module):
    """y = x W^T + b, torch.nn.Linear's initialisation: U(-1/sqrt(in), 1/sqrt(in)),
    or init='kaiming_normal': weight from N(0, 2/out_features)."""

    def __init__(self, in_features, out_features, bias=True, init="default"):
        super().__init__()
        initialisers.check_init(init)
        in_features = validate.positive_int(in_features, "in_features", type_error=TypeError)
        out_features = validate.positive_int(out_features, "out_features", type_error=TypeError)
        self.in_features, self.out_features = in_features, out_features
        shape = (out_features, in_features)
        weight, bias = initialisers.layer_parameters(shape, bias, init)
        self.weight = self._parameter("weight", weight)
        self.bias = self._parameter("bias", bias)

    def forward(self, x):
        y, ctx = F.basic.linear_forward(x, self.weight.data, self.bias.data if self.bias else None)
        self._keep(ctx)
        return y

    def backward(self, dy, need_input_grad=True):
        dx, dw, db = F.linear_backward(dy, self._take(), self.weight.data)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability p and
    scale the rest by 1/(1-p); in eval, the identity."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = validate.number(p, "p", 0, 1, what="a probability in [0, 1]")
        self.seed = int(random.host_rng().integers(2**63))
        self.calls = 0  # masks drawn so far: with the seed, the whole random state
        self.share = (0, 1)  # (rank, ranks): see set_share

    def set_share(self, rank, ranks):
        """One of `ranks` data-parallel ranks, holding rows rank, rank + ranks, ... of
        each global batch (gpucnn.distributed.shard): the masks are drawn for the
        global batch and this rank applies its rows, so that R ranks drop what one
        process of the global batch would (and not the same mask on every rank)."""
        ranks = validate.positive_int(ranks, "ranks", type_error=TypeError)
        rank = validate.integer(rank, "rank", 0, type_error=TypeError)
        if rank >= ranks:
            raise ValueError(f"rank must lie in [0, {ranks - 1}] for {ranks} ranks, got {rank}")
        self.share = (rank, ranks)

    def get_rng_state(self):
        return {"seed": self.seed, "calls": self.calls}

    def set_rng_state(self, state):
        self.seed, self.calls = int(state["seed"]), int(state["calls"])

    def forward(self, x):
        draws = self.training and self.p != 0
        y, ctx = F.basic.dropout_forward(x, self.p, (self.seed, self.calls) if draws else None,
                                         self.share)
        if draws:
            self.calls += 1
        self._keep(ctx)
        return y

    def backward(self, dy, need_input_grad=True):
        return F.basic.dropout_backward(dy, self._take())

    def extra_repr(self):
        return f"p={self.p}"


class GlobalAvgPool2D(Module):
    """(N, C, H, W) -> (N, C): each channel's mean (AdaptiveAvgPool2d(1) + flatten)."""

    def forward(self, x):
        y, ctx = F.basic.global_avg_pool2d_forward(x)
        self._keep(ctx)
        return y

    def backward(self, dy, need_input_grad=True):
        return F.global_avg_pool2d_backward(dy, self._take())


class Identity(Module):
    """Returns its input; backward returns dy. Its backward needs nothing from its
    forward, so it keeps no ctx (and may run any number of times)."""

    def forward(self, x):
        return x

    def backward(self, dy, need_input_grad=True):
        return dy
