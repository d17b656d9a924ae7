"""CUDA-graph replay of the training step (``gpucnn train --cuda-graph``).

A training step is about a hundred small kernels; launched one by one from
Python, each costs more host time than the GPU needs to run it. Captured once
into a CUDA graph, a step is one launch. The recipe (as PyTorch's whole-network capture):

1. warm-up: a few eager steps on a side stream, so that every lazily created
   buffer (momentum, Adam's moments and step counts, the device lr, kernels'
   modules, CuPy's own kernels) exists: a capture must find them in place;
2. static input buffers: each batch is copied into the same two device arrays;
3. a memory pool of its own for everything the captured step allocates, so the
   addresses baked into the graph stay reserved for it;
4. capture: one step recorded on the side stream, then replayed for every batch
   of the captured shape. A batch of another shape (the last, partial one) runs
   eagerly.

What the step reads that changes from step to step lives on the device, as in
PyTorch's ``capturable`` optimizers, so one capture serves the whole run: the
learning rate is a 0-d device array that ``optimizer.lr = x`` fills in place (a
schedule or warmup stepped per batch changes it between replays, with no sync
and no new capture), and Adam counts its steps and computes its bias
corrections on the device. Label smoothing is a constant of the run, captured
with the step; augmentation runs on the batch before it is copied into the
static input. A module that draws random numbers (one with a random state, as
Dropout) would draw the same numbers at every replay (its generator is seeded on
the host per call), so with one the step runs eagerly, said once. A capture that
fails falls back to eager steps with one line saying why.

The step itself is the caller's (gpucnn.step.train_step): this module runs it,
it does not import it.
"""
from ... import validate
from .. import device as backend

WARMUP = 3


class GraphedStep:
    """step(model, optimizer, x, y) for batches of one shape, replayed from a CUDA graph.

    step: the training step, called as step(model, optimizer, x, y,
    label_smoothing=...) and returning (loss, logits) (gpucnn.step.train_step).
    Call it like the step: ``loss, logits = graphed(x, y)``; the results are the
    graph's static outputs, overwritten by the next call (read or reduce them first).
    label_smoothing: as train_step's, fixed for the run. capture=False runs the same
    static-buffer path without capturing. warmup (>= 1) eager steps come first: they
    create what the first step creates (momentum buffers, Adam's moments, the device
    lr), which a capture must find in place. The graph holds the addresses of the
    arrays it captured; load_state_dict (model or optimizer) writes into those
    arrays, so state loaded after the first call is what the replays use.
    """

    def __init__(self, model, optimizer, *, step, label_smoothing=0.0, capture=True,
                 warmup=WARMUP, log=print):
        self.model, self.optimizer, self.step_fn, self.log = model, optimizer, step, log
        self.xp = backend.get_array_module(model.parameters()[0].data)
        if self.xp is backend.numpy:
            raise ValueError("GraphedStep needs a model on a CUDA device, got one on the cpu")
        if not callable(step):
            raise TypeError(f"step must be the training step to run (gpucnn.train_step), "
                            f"got {step!r}")
        warmup = validate.integer(warmup, "warmup", 1,
                                  what="an int >= 1 (eager steps before the capture)")
        self.label_smoothing = label_smoothing
        self.warmup, self.calls = warmup, 0
        self.static_x = self.static_y = None
        self.graph, self.outputs = None, None
        self.replays = backend.graph_capture_replays(self.xp)
        self.capture = capture and self._capturable()
        cuda = self.xp.cuda
        self.stream = cuda.Stream(non_blocking=True)
        self.pool = cuda.MemoryPool() if self.capture else None

    def _capturable(self):
        drawing = self.model.random_state()  # {module name: state} of modules drawing numbers
        if drawing:
            modules = dict(self.model.named_modules())
            kinds = ", ".join(sorted({type(modules[name]).__name__ for name in drawing}))
            self.log(f"gpucnn: CUDA graph off: a replayed {kinds} would draw the same random "
                     "numbers at every step; running eagerly")
            return False
        if not getattr(self.optimizer, "capturable", False):
            name = type(self.optimizer).__name__
            self.log(f"gpucnn: CUDA graph off: {name} does not read its per-step values from "
                     "the device (capturable = False); running eagerly")
            return False
        return True

    def _eager(self, x, y):
        return self.step_fn(self.model, self.optimizer, x, y,
                            label_smoothing=self.label_smoothing)

    def __call__(self, x, y):
        if self.static_x is None:
            self.static_x = self.xp.empty_like(x)
            self.static_y = self.xp.empty_like(y)
        if x.shape != self.static_x.shape or y.shape != self.static_y.shape:
            return self._eager(x, y)  # e.g. the last partial batch
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
            return self._eager(self.static_x, self.static_y)
        if not self.capture or self.calls <= self.warmup:
            return self._eager(self.static_x, self.static_y)
        return self._capture()

    def _capture(self):
        steps = self.optimizer.steps
        try:
            with self.xp.cuda.using_allocator(self.pool.malloc):
                self.stream.begin_capture()
                try:
                    outputs = self._eager(self.static_x, self.static_y)
                finally:
                    graph = self.stream.end_capture()
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly from now on
            self.log(f"gpucnn: CUDA graph capture failed ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); training continues eagerly")
            self.capture, self.optimizer.steps = False, steps
            return self._eager(self.static_x, self.static_y)
        self.graph, self.outputs = graph, outputs
        if self.replays:
            graph.launch(self.stream)  # capturing recorded the step; this runs it
        return outputs

