"""GradientReducer: the data-parallel gradient average, in buckets that start
summing across ranks while backward is still running.

    reducer = GradientReducer(model, communicator_for(world, xp))
    loss, logits = train_step(model, optimizer, x, y, reducer=reducer)

The parameters are taken in reverse order (the order backward finishes them) and
packed into flat buckets of at most bucket_bytes each (one dtype a bucket; a
parameter larger than that is a bucket of its own). When a container reports
that a module's backward is done (gpucnn.nn.module.add_backward_done_hook), its
parameters' gradients are final; a bucket whose gradients are all final is
copied into its flat buffer and its all-reduce started, in bucket order, so
every rank starts the same collectives in the same order. finish() starts any
bucket not started yet, waits for all, and writes each gradient back as
sum * (1/R): the same sum, then the same multiply, on every rank, so every
rank's gradients, and so its parameters, are the same bits.

The buffers are made once and reused every step (fixed addresses, which a CUDA
graph of the step needs).
"""
import time
import weakref

from .. import backend, validate
from ..nn.module import Module, add_backward_done_hook
from .comm import Communicator
from .world import DistributedError

DEFAULT_BUCKET_BYTES = 25 * 2**20  # PyTorch DDP's default bucket_cap_mb


class _Bucket:
    """Parameters packed one after another into one flat buffer."""

    def __init__(self, index, params):
        self.index, self.params = index, params
        self.offsets, total = [], 0
        for _, p in params:
            self.offsets.append(total)
            total += p.data.size
        self.numel = total
        self.buffer = None
        self.pending = None
        self.remaining = len(params)

    def pack(self):
        """Copy the gradients into the flat buffer (zeros for a parameter without one)."""
        first = self.params[0][1].data
        if self.buffer is None or self.buffer.dtype != first.dtype or (
                backend.device_of(self.buffer) != backend.device_of(first)):  # after model.to()
            self.buffer = backend.get_array_module(first).empty(self.numel, first.dtype)
        for (_, p), offset in zip(self.params, self.offsets):
            view = self.buffer[offset:offset + p.data.size]
            if p.grad is None:
                view.fill(0)
            else:
                view[...] = p.grad.reshape(-1)

    def unpack(self, scale):
        """Each gradient <- its slice of the summed buffer times scale."""
        xp = backend.get_array_module(self.buffer)
        for (_, p), offset in zip(self.params, self.offsets):
            view = self.buffer[offset:offset + p.data.size].reshape(p.data.shape)
            if p.grad is None or p.grad.shape != p.data.shape:
                p.grad = view * scale
            else:
                xp.multiply(view, scale, out=p.grad)


def plan_buckets(named_params, bucket_bytes):
    """Split (name, Parameter) pairs, taken in reverse, into buckets: a new one where
    the dtype changes or the next parameter would take the bucket past bucket_bytes.
    Returns lists of (name, Parameter)."""
    buckets, current, size, dtype = [], [], 0, None
    for name, p in reversed(list(named_params)):
        nbytes = p.data.size * p.data.dtype.itemsize
        if current and (p.data.dtype != dtype or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append((name, p))
        size, dtype = size + nbytes, p.data.dtype
    if current:
        buckets.append(current)
    return buckets


def _weak_hook(reducer):
    ref = weakref.ref(reducer)

    def hook(module):
        alive = ref()
        if alive is not None:
            alive._module_done(module)
    return hook


class GradientReducer:
    """Averages a model's gradients across the ranks of a communicator, bucket by
    bucket, the buckets started during backward (see the module's docstring).

    model: a Module; communicator: a gpucnn.distributed Communicator
    (communicator_for(world, xp)); bucket_bytes: the most bytes of gradient a
    bucket holds (25 MiB, PyTorch DDP's default). Use it through
    train_step(..., reducer=reducer), or call begin() before forward and finish()
    between backward and the optimizer's step. Each module must run once per
    forward (no weight shared between two places in the model).
    """

    def __init__(self, model, communicator, bucket_bytes=DEFAULT_BUCKET_BYTES):
        if not isinstance(model, Module):
            raise DistributedError(f"model must be a gpucnn Module, got {type(model).__name__}")
        if not isinstance(communicator, Communicator):
            raise DistributedError(f"communicator must be a gpucnn.distributed Communicator, "
                                   f"got {type(communicator).__name__}")
        self.bucket_bytes = validate.positive_int(bucket_bytes, "bucket_bytes",
                                                  error=DistributedError)
        self.model, self.communicator = model, communicator
        named = list(model.named_parameters())
        if not named:
            raise DistributedError("model has no parameters: there is no gradient to average")
        self.buckets = [_Bucket(i, params)
                        for i, params in enumerate(plan_buckets(named, self.bucket_bytes))]
        self._where = {id(p): bucket for bucket in self.buckets for _, p in bucket.params}
        self._owned = {}  # module -> its own parameters
        # held weakly: the model outlives a reducer dropped without close(), whose
        # hooks then do nothing instead of keeping it (and its buffers) alive
        hook, self._removers = _weak_hook(self), []
        for _, m in model.named_modules():
            own = [p for p in m._params.values() if p is not None]
            if own:
                self._owned[m] = own
                self._removers.append(add_backward_done_hook(m, hook))
        self._armed, self._next, self._final = False, 0, set()
        self.timings = {"steps": 0, "wait_s": 0.0, "started_in_backward": 0, "buckets": 0}

    def begin(self):
        """Before a step's forward: every gradient is pending again."""
        for bucket in self.buckets:
            bucket.remaining, bucket.pending = len(bucket.params), None
        self._armed, self._next, self._final = True, 0, set()

    def _module_done(self, module):
        if not self._armed:
            return
        for p in self._owned.get(module, ()):
            if id(p) in self._final:
                raise DistributedError(
                    f"{type(module).__name__}'s backward ran twice in one step; GradientReducer "
                    "needs each module used once per forward (a shared weight would be summed "
                    "across ranks before its gradient is complete)")
            self._final.add(id(p))
            self._where[id(p)].remaining -= 1
        self._start_ready()

    def _start_ready(self, everything=False):
        """Start the buckets, in order, from the next one on while they are ready."""
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.remaining > 0 and not everything:
                return
            bucket.pack()
            bucket.pending = self.communicator.start_allreduce_sum_(bucket.buffer)
            self._next += 1

    def finish(self):
        """After backward: start what is left, wait for every bucket and write each
        gradient back as the ranks' sum times 1/R."""
        if not self._armed:
            raise DistributedError("GradientReducer.finish() without begin(): call begin() "
                                   "before the step's forward (train_step does)")
        early = self._next
        self._start_ready(everything=True)
        scale = 1.0 / self.communicator.size
        t0 = time.perf_counter()
        for bucket in self.buckets:
            bucket.pending.wait()
            bucket.pending = None
            bucket.unpack(scale)
        self._armed = False
        t = self.timings
        t["wait_s"] += time.perf_counter() - t0
        t["steps"] += 1
        t["started_in_backward"] += early
        t["buckets"] += len(self.buckets)

    def close(self):
        """Remove the reducer's hooks from the model (the model can then train alone or
        under another reducer without this one's hooks running)."""
        for remove in self._removers:
            remove()
        self._removers, self._armed = [], False

    def __repr__(self):
        sizes = [b.numel for b in self.buckets]
        return (f"GradientReducer({len(self.buckets)} buckets of {sizes} elements, "
                f"bucket_bytes={self.bucket_bytes}, ranks={self.communicator.size})")
