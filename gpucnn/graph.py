"""CUDA-graph replay of the training step (``gpucnn train --cuda-graph``).

A LeNet step is ~100 small kernels; launched one by one from Python each costs
8-15 us of host time, more than the GPU needs to run it. Captured once into a
CUDA graph, a step is one launch. The recipe (as PyTorch's whole-network capture):

1. warm-up: a few eager steps on a side stream, so that every lazily created
   buffer (momentum, kernels' modules, CuPy's own kernels) exists;
2. static input buffers: each batch is copied into the same two device arrays;
3. a memory pool of its own for everything the captured step allocates, so the
   addresses baked into the graph stay reserved for it;
4. capture: one step recorded on the side stream, then replayed for every batch
   of the captured shape. A batch of another shape (the last, partial one) runs
   eagerly.

The step must be replayable: only SGD is (its learning rate is read at capture
and a change triggers a new capture); Adam's bias correction is computed on the
host each step, and a replayed Dropout would reuse one mask, so with either the
step runs eagerly (said once). A capture that fails falls back to eager steps
with one line saying why.
"""
from . import backend
from .nn.layers import Dropout
from .optim import SGD
from .step import train_step

WARMUP = 3


class GraphedStep:
    """train_step(model, optimizer, x, y) for batches of one shape, replayed from a CUDA graph.

    Call it like train_step: ``loss, logits = graphed(x, y)``; the results are the
    graph's static outputs, overwritten by the next call (read or reduce them first).
    capture=False runs the same static-buffer path without capturing.
    """

    def __init__(self, model, optimizer, *, capture=True, warmup=WARMUP, log=print):
        self.model, self.optimizer, self.log = model, optimizer, log
        self.xp = backend.get_array_module(model.parameters()[0].data)
        if self.xp is backend.numpy:
            raise ValueError("GraphedStep needs a model on a CUDA device, got one on the cpu")
        self.warmup, self.calls = warmup, 0
        self.static_x = self.static_y = None
        self.graph, self.outputs, self.lr = None, None, None
        self.replays = backend.graph_capture_replays(self.xp)
        self.capture = capture and self._capturable()
        cuda = self.xp.cuda
        self.stream = cuda.Stream(non_blocking=True)
        self.pool = cuda.MemoryPool() if self.capture else None

    def _capturable(self):
        if any(isinstance(m, Dropout) and m.p > 0 for m in _modules(self.model)):
            self.log("gpucnn: CUDA graph off: a replayed Dropout would draw the same mask at "
                     "every step; running eagerly")
            return False
        if not isinstance(self.optimizer, SGD):
            name = type(self.optimizer).__name__
            self.log(f"gpucnn: CUDA graph off: {name}'s step computes its bias correction "
                     "on the host each step; running eagerly")
            return False
        return True

    def __call__(self, x, y):
        if self.static_x is None:
            self.static_x = self.xp.empty_like(x)
            self.static_y = self.xp.empty_like(y)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            return train_step(self.model, self.optimizer, x, y)  # e.g. the last partial batch
        if self.graph is not None and self.optimizer.lr != self.lr:
            self.graph = None  # the learning rate is baked into the graph: capture again
        current = self.xp.cuda.get_current_stream()
        self.stream.wait_event(current.record())  # x and y were written on the current stream
        with self.stream:
            self.static_x[...] = x
            self.static_y[...] = y
            out = self._step()
        current.wait_event(self.stream.record())  # what follows reads the step's results
        return out

    def _step(self):
        self.calls += 1
        if self.graph is not None:
            if self.replays:
                self.graph.launch(self.stream)
                self.optimizer.steps += 1  # the host-side count, as the eager step keeps it
                return self.outputs
            return train_step(self.model, self.optimizer, self.static_x, self.static_y)
        if not self.capture or self.calls <= self.warmup:
            return train_step(self.model, self.optimizer, self.static_x, self.static_y)
        return self._capture()

    def _capture(self):
        steps = self.optimizer.steps
        try:
            with self.xp.cuda.using_allocator(self.pool.malloc):
                self.stream.begin_capture()
                try:
                    outputs = train_step(self.model, self.optimizer, self.static_x, self.static_y)
                finally:
                    graph = self.stream.end_capture()
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly from now on
            self.log(f"gpucnn: CUDA graph capture failed ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); training continues eagerly")
            self.capture, self.optimizer.steps = False, steps
            return train_step(self.model, self.optimizer, self.static_x, self.static_y)
        self.graph, self.outputs, self.lr = graph, outputs, self.optimizer.lr
        if self.replays:
            graph.launch(self.stream)  # capturing recorded the step; this runs it
        return outputs


def _modules(module):
    yield module
    for child in module.children():
        yield from _modules(child)
