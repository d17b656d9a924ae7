"""BatchNorm2D: torch.nn.BatchNorm2d's arguments, parameters, buffers and semantics."""
import numpy

from .. import functional as F
from .. import validate
from .module import Buffer, Module


class BatchNorm2D(Module):
    """Batch normalisation over (N, H, W) per channel of an (N, C, H, W) input.

    weight (C,) = 1 and bias (C,) = 0 when affine; buffers running_mean (C,) = 0,
    running_var (C,) = 1 and num_batches_tracked (int64 scalar) when
    track_running_stats. Training normalises with the batch statistics and updates
    the running ones (momentum, or the cumulative average when momentum=None);
    eval normalises with the running statistics (with the batch's when
    track_running_stats=False). Equations: gpucnn.functional.batchnorm.

    sync: a gpucnn.distributed Communicator whose ranks share the statistics of
    the global batch in training (sync-BN; gpucnn.distributed.convert_sync_batchnorm
    sets it on every BatchNorm2D of a model); None normalises with this process's
    batch. Eval never communicates.
    """

    sync = None

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, sync=None):
        super().__init__()
        if sync is not None:
            if not callable(getattr(sync, "allreduce_sum_", None)):
                raise TypeError(f"sync must be a gpucnn.distributed Communicator or None, got "
                                f"{type(sync).__name__}")
            self.sync = sync
        num_features = validate.positive_int(num_features, "num_features")
        eps = validate.number(eps, "eps", 0, low_open=True)
        if momentum is not None:  # kept as given (a float or an int), as PyTorch does
            validate.number(momentum, "momentum", 0, 1, what="a number in [0, 1] or None")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        C = num_features
        if self.affine:
            self._parameter("weight", numpy.ones(C, numpy.float32))
            self._parameter("bias", numpy.zeros(C, numpy.float32))
        if self.track_running_stats:
            self._buffers["running_mean"] = Buffer(numpy.zeros(C, numpy.float32))
            self._buffers["running_var"] = Buffer(numpy.ones(C, numpy.float32))
            self._buffers["num_batches_tracked"] = Buffer(numpy.zeros((), numpy.int64))

    def _get(self, store, name):
        item = store.get(name)
        return None if item is None else item.data if store is self._buffers else item

    weight = property(lambda self: self._params.get("weight"))
    bias = property(lambda self: self._params.get("bias"))
    running_mean = property(lambda self: self._get(self._buffers, "running_mean"))
    running_var = property(lambda self: self._get(self._buffers, "running_var"))
    num_batches_tracked = property(lambda self: self._get(self._buffers, "num_batches_tracked"))

    def _check_input(self, x):
        if not hasattr(x, "shape") or x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"{self!r} got input of shape {tuple(getattr(x, 'shape', ()))}; "
                             f"it needs (N, {self.num_features}, H, W)")
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            raise ValueError(f"{self!r} in training needs more than 1 value per channel, got "
                             f"input of shape {tuple(x.shape)}; use a batch of 2 or more, or "
                             f"eval()")

    def forward(self, x):
        self._check_input(x)
        use_batch = self.training or not self.track_running_stats
        momentum = 0.0
        if self.training and self.track_running_stats:
            tracked = self._buffers["num_batches_tracked"]
            tracked.data += 1  # stays on the device: no sync
            # momentum=None: the cumulative average, factor 1/num_batches_tracked, kept
            # as a 0-d device array so that no value crosses to the host
            momentum = (1 / tracked.data.astype(x.dtype) if self.momentum is None
                        else self.momentum)
        y, ctx = F.batch_norm(
            x, self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.weight.data if self.affine else None, self.bias.data if self.affine else None,
            training=use_batch, momentum=momentum, eps=self.eps,
            # kept memory in training only: an eval forward (Module.summary's, or
            # several threads' running one model) must not write over it
            workspace=self._workspace if self.training else None,
            **({"sync": self.sync} if self.sync is not None and self.training else {}))
        self._keep(ctx)
        return y

    def backward(self, dy, need_input_grad=True):
        dx, dw, db = F.batch_norm_backward(dy, self._take(),
                                           self.weight.data if self.affine else None)
        if self.affine:
            self.weight.accumulate(dw)
            self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
