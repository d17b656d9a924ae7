"""Benchmark: each conv pass, both pools and a LeNet training step, next to
PyTorch measured in the same run (where torch is installed), with the ratio and
the goal it is held to; on a GPU also the step replayed from a CUDA graph (each
library's own capture) and the peak memory of a LeNet step.

    python -m gpucnn.tools.bench [--device cpu|cuda|auto] [--repeat N] [--json FILE] [--smoke]

Ratios above 1 mean gpucnn is slower. On the GPU, PyTorch runs cuDNN in FP32
with TF32 off and both sides are timed with CUDA events after warm-up; medians
are reported. The goals on a GPU: every conv pass <= 1.2x cuDNN where C and
K >= 32, <= 1.5x elsewhere; LeNet step >= 1.25x PyTorch's images/s at batch 256;
peak memory <= 1.5x. On the CPU: docs/benchmarks.md's.
"""
import argparse
import gc
import json
import statistics
import sys
import time

import numpy

import gpucnn
from .. import backend, functional as F
from ..backends.cpu import threads as cpu_threads
from ..app import models
from ..functional import conv, pool
from ..step import train_step


# (N, C, H, W, K, kernel, stride, pad[, dilation]): LeNet's layers and common CNN
# layers from small to large, all timed on a GPU.
# `gpucnn tune --bench` imports this list.
def _lenet_convs(n):
    return [(n, 1, 28, 28, 32, 5, 1, 2), (n, 32, 14, 14, 64, 5, 1, 2)]


_SMALL = [(128, 3, 32, 32, 64, 3, 1, 1), (128, 64, 16, 16, 128, 3, 1, 1),
          (64, 16, 32, 32, 32, 3, 2, 1), (64, 16, 32, 32, 32, 3, 1, 2, 2)]
_LARGE = [(32, 64, 56, 56, 64, 3, 1, 1), (128, 128, 28, 28, 128, 3, 1, 1),
          (64, 256, 14, 14, 256, 3, 1, 1)]
CONV_SHAPES = _lenet_convs(64) + _lenet_convs(256) + _SMALL + _LARGE
CPU_CONV_SHAPES = _lenet_convs(64) + _SMALL  # the CPU table of docs/benchmarks.md
# (N, C, H, W, kernel, stride, pad): the LeNet's pools and an overlapping one
POOL_SHAPES = [(64, 32, 28, 28, 2, 2, 0), (64, 64, 14, 14, 2, 2, 0), (64, 64, 32, 32, 3, 2, 1)]
STEP_BATCHES = {"cuda": (64, 256), "cpu": (64,)}
MEMORY_BATCH = 256
# --smoke: one tiny case of each kind, to check that the benchmark runs (tests, CI)
SMOKE = dict(conv=[(2, 3, 8, 8, 4, 3, 1, 1)], pool=[(2, 4, 8, 8, 3, 2, 1)], batch=2)


def conv_goal(device, shape):
    """The largest time ratio to PyTorch a conv pass of this shape may have."""
    if device == "cpu":
        return 2.0
    C, K = shape[1], shape[4]
    return 1.2 if min(C, K) >= 32 else 1.5


# Time ratio of the LeNet step (gpucnn / PyTorch): on a GPU >= 1.25x PyTorch's images/s
# at batch 256; on the CPU at most 1.5x its time. Peak memory of a step: <= 1.5x.
STEP_GOAL = {"cuda": {256: 1 / 1.25}, "cpu": {64: 1.5}}
MEMORY_GOAL = 1.5


class Timer:
    """Median wall time of fn() in ms: clock (perf_counter) on the CPU, CUDA events on
    a GPU."""

    def __init__(self, device, repeat, warmup=2, clock=time.perf_counter):
        self.device, self.repeat, self.warmup, self.clock = device, repeat, warmup, clock

    def __call__(self, fn, torch_cuda=False):
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            if torch_cuda:
                import torch
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                elapsed = start.elapsed_time
            else:
                cp = backend.xp_for("cuda")
                start, end = cp.cuda.Event(), cp.cuda.Event()
                elapsed = lambda e: cp.cuda.get_elapsed_time(start, e)  # noqa: E731
            for _ in range(self.repeat):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(elapsed(end))
        else:
            for _ in range(self.repeat):
                t0 = self.clock()
                fn()
                times.append((self.clock() - t0) * 1e3)
        return statistics.median(times)

    def pair(self, ours, theirs):
        """(median ms of ours, of theirs or None), timed so that a load that comes and
        goes on a shared machine weighs on both alike. Single-threaded on the CPU the
        two alternate run by run after their warm-up. With more threads they take
        turns of a few runs (TURNS turns), the first run of each turn untimed: BLAS's
        and OpenMP's threads spin a while after each call and would slow the other
        library's next run; timed whole one after the other, a load shift between the
        halves would weigh on one library only (docs/benchmarks.md). On a GPU each is
        timed in turn."""
        if theirs is None:
            return self(ours), None
        if self.device == "cuda":
            return self(ours), self(theirs, torch_cuda=True)
        threaded = cpu_threads.get_num_threads() > 1 or (cpu_threads.blas_threads() or 2) > 1
        turns, times = (min(TURNS, self.repeat) if threaded else self.repeat), ([], [])
        for turn in range(turns):
            timed = self.repeat // turns + (turn < self.repeat % turns)
            untimed = max(self.warmup if turn == 0 else 0, int(threaded))
            for fn, into in ((ours, times[0]), (theirs, times[1])):
                for run in range(untimed + timed):
                    t0 = self.clock()
                    fn()
                    if run >= untimed:
                        into.append((self.clock() - t0) * 1e3)
        return statistics.median(times[0]), statistics.median(times[1])


TURNS = 5


def _torch(device):
    try:
        import torch
    except ImportError:
        return None
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    else:
        # as many threads as gpucnn's CPU passes use (its default is the BLAS's
        # thread count, so OPENBLAS_NUM_THREADS=1 pins both)
        torch.set_num_threads(cpu_threads.get_num_threads())
    return torch


def _threads(device, torch):
    """'; N threads each' on the CPU, where both sides' thread counts are known."""
    if device == "cuda" or torch is None:
        return ""
    return (f"; {torch.get_num_threads()} thread(s) each (gpucnn's BLAS "
            f"{cpu_threads.step_blas_threads()} in a step)")


def _conv_cases(shape, xp, torch, device, rng):
    N, C, H, W, K, k, s, p, *d = shape
    d = d[0] if d else 1
    x = xp.asarray(rng.standard_normal((N, C, H, W)).astype(numpy.float32))
    w = xp.asarray(rng.standard_normal((K, C, k, k)).astype(numpy.float32) * 0.1)
    kw = dict(stride=s, padding=p, dilation=d)
    g = conv.geometry(x, w, None, **kw)
    dy = xp.asarray(rng.standard_normal((N, K, g.P, g.Q)).astype(numpy.float32))
    ours = {"forward": lambda: F.conv2d(x, w, **kw),
            "backward-data": lambda: conv.backward_data(dy, w, g),
            "backward-filter": lambda: conv.backward_filter(dy, x, g)}
    theirs = {}
    if torch is not None:
        dev = "cuda" if device == "cuda" else "cpu"
        tx, tw, tdy = (torch.from_numpy(backend.to_numpy(a)).to(dev) for a in (x, w, dy))
        tconv = torch.ops.aten.convolution_backward
        args = ([s, s], [p, p], [d, d], False, [0, 0], 1)
        theirs = {"forward": lambda: torch.nn.functional.conv2d(tx, tw, None, s, p, d),
                  "backward-data": lambda: tconv(tdy, tx, tw, None, *args, [True, False, False]),
                  "backward-filter": lambda: tconv(tdy, tx, tw, None, *args, [False, True, False])}
    return ours, theirs


def _pool_cases(shape, xp, torch, device, rng):
    N, C, H, W, k, s, p = shape
    x = xp.asarray(rng.standard_normal((N, C, H, W)).astype(numpy.float32))
    kw = dict(kernel_size=k, stride=s, padding=p)
    g = pool.geometry(x, **kw)
    dy = xp.asarray(rng.standard_normal((N, C, g.P, g.Q)).astype(numpy.float32))

    def max_ours():
        y, idx = F.max_pool2d(x, **kw)
        return F.max_pool2d_backward(dy, idx, x.shape, **kw)

    def avg_ours():
        F.avg_pool2d(x, **kw)
        return F.avg_pool2d_backward(dy, x.shape, **kw)
    ours, theirs = {"max fwd+bwd": max_ours, "avg fwd+bwd": avg_ours}, {}
    if torch is not None:
        dev = "cuda" if device == "cuda" else "cpu"
        tx = torch.from_numpy(backend.to_numpy(x)).to(dev)
        tdy = torch.from_numpy(backend.to_numpy(dy)).to(dev)
        aten = torch.ops.aten

        def max_theirs():
            y, idx = aten.max_pool2d_with_indices(tx, [k, k], [s, s], [p, p])
            return aten.max_pool2d_with_indices_backward(tdy, tx, [k, k], [s, s], [p, p], [1, 1],
                                                         False, idx)

        def avg_theirs():
            aten.avg_pool2d(tx, [k, k], [s, s], [p, p])
            return aten.avg_pool2d_backward(tdy, tx, [k, k], [s, s], [p, p], False, True, None)
        theirs = {"max fwd+bwd": max_theirs, "avg fwd+bwd": avg_theirs}
    return ours, theirs


def training_step(net, opt, x, y):
    """gpucnn's LeNet step as bench (and gpucheck) time it: the library's one train_step."""
    return train_step(net, opt, x, y)[0]


def _torch_lenet(torch, dev):
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10)).to(dev)


def _step_batch(batch, rng):
    return (rng.standard_normal((batch, 1, 28, 28)).astype(numpy.float32),
            rng.integers(0, 10, batch))


def _our_step(device, x, y):
    gpucnn.manual_seed(0)
    net = models.lenet().to(device)
    opt = gpucnn.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = backend.to_device(x, device), backend.to_device(y, device)
    return lambda: training_step(net, opt, x, y)


def _their_step(torch, device, x, y):
    dev = "cuda" if device == "cuda" else "cpu"
    tnet = _torch_lenet(torch, dev)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)

    def step():
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tnet(tx), ty).backward()
        topt.step()
    return step


def _step_cases(batch, torch, device, rng):
    x, y = _step_batch(batch, rng)
    ours = {"training step": _our_step(device, x, y)}
    return ours, ({} if torch is None else {"training step": _their_step(torch, device, x, y)})


def _our_graphed_step(x, y):
    """gpucnn's LeNet step replayed from a CUDA graph, as `gpucnn train` runs it on a
    GPU (GraphedStep copies each batch into its static inputs), past its capture, as
    PyTorch's is."""
    from ..backends.cuda.graph import GraphedStep
    gpucnn.manual_seed(0)
    net = models.lenet().to("cuda")
    opt = gpucnn.SGD(net.parameters(), lr=0.01, momentum=0.9)
    graphed = GraphedStep(net, opt, step=train_step,
                          log=lambda line: print(line, file=sys.stderr))
    x, y = backend.to_device(x, "cuda"), backend.to_device(y, "cuda")
    for _ in range(graphed.warmup + 1):  # the eager steps and the capture, not timed
        graphed(x, y)
    return lambda: graphed(x, y)


def _their_graphed_step(torch, x, y):
    """PyTorch's LeNet step in a CUDA graph, by its documented whole-network capture:
    warm-up on a side stream, gradients set to None, one captured step replayed, each
    batch copied into the static inputs first."""
    tnet = _torch_lenet(torch, "cuda")
    topt = torch.optim.SGD(tnet.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    static_x, static_y = tx.clone(), ty.clone()

    def step():
        torch.nn.functional.cross_entropy(tnet(static_x), static_y).backward()
        topt.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            topt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    topt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()

    def replay():
        static_x.copy_(tx)
        static_y.copy_(ty)
        graph.replay()
    return replay


def _graphed_step_cases(batch, torch, rng):
    x, y = _step_batch(batch, rng)
    ours = {"training step": _our_graphed_step(x, y)}
    return ours, ({} if torch is None else {"training step": _their_graphed_step(torch, x, y)})


def _peak_hook(cp):
    """A public cupy.cuda.MemoryHook that records the peak of the bytes handed out by
    CuPy's memory pool while it is installed (the pool keeps no peak of its own)."""
    class PeakHook(cp.cuda.MemoryHook):
        name = "gpucnn-bench-peak"

        def __init__(self):
            self.used = self.peak = 0

        def malloc_postprocess(self, **kw):
            self.used += kw["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kw):
            self.used -= kw["mem_size"]
    return PeakHook()


def peak_memory(torch, rng, batch=MEMORY_BATCH):
    """Peak device memory (MiB) of two LeNet SGD steps at `batch`, counting what is
    allocated from the building of the model on (weights, optimizer state, the batch,
    activations, gradients): gpucnn's through CuPy's pool, PyTorch's by
    max_memory_allocated. Returns (gpucnn, torch), None where not measured."""
    cp = backend.xp_for("cuda")
    if not hasattr(cp.cuda, "MemoryHook"):  # CuPy has it; a CuPy-like module may not
        return None, None
    x, y = _step_batch(batch, rng)
    gc.collect()
    cp.cuda.Device().synchronize()
    hook = _peak_hook(cp)
    with hook:
        step = _our_step("cuda", x, y)
        for _ in range(2):  # the second step has the optimizer's state
            step()
        cp.cuda.Device().synchronize()
        del step
    theirs = None
    if torch is not None:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step = _their_step(torch, "cuda", x, y)
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        theirs = (torch.cuda.max_memory_allocated() - base) / 2**20
    return hook.peak / 2**20, theirs


def _fmt(v, spec, suffix=""):
    return format(v, spec) + suffix if v is not None else "-"


def run(device="auto", repeat=10, out=None, smoke=False):
    """Time every case, print the table to out (stdout), return {"meta", "rows", "memory"}."""
    out = out or sys.stdout
    device, why = backend.resolve_device(device)
    xp = backend.xp_for(device)
    torch = _torch(device)
    timer = Timer(device, repeat, warmup=3 if device == "cuda" else 2)
    rng = numpy.random.default_rng(0)
    meta = dict(gpucnn=gpucnn.__version__, device=device, repeat=repeat, smoke=smoke,
                torch=None if torch is None else torch.__version__)
    if device == "cuda":
        rt = xp.cuda.runtime
        meta["gpu"] = rt.getDeviceProperties(rt.getDevice())["name"].decode()
        if torch is not None:
            meta["cudnn"] = torch.backends.cudnn.version()
    print(f"gpucnn {gpucnn.__version__} benchmark on {device} ({why})"
          f"{', ' + meta['gpu'] if 'gpu' in meta else ''}; float32; median of {repeat} runs; "
          f"torch {'(not installed)' if torch is None else torch.__version__}"
          f"{'; TF32 off' if device == 'cuda' else ''}{_threads(device, torch)}", file=out)
    print(f"{'case':<62}{'gpucnn ms':>11}{'torch ms':>11}{'ratio':>8}{'goal':>8}  met",
          file=out)
    rows = []

    def report(label, ours, theirs, goal=None):
        goal = None if smoke else goal  # the smoke shapes are held to nothing
        for name, fn in ours.items():
            t_ours, t_theirs = timer.pair(fn, theirs.get(name))
            ratio = t_ours / t_theirs if t_theirs else None
            met = None if ratio is None or goal is None else ratio <= goal
            rows.append(dict(case=f"{label} {name}", gpucnn_ms=t_ours, torch_ms=t_theirs,
                             ratio=ratio, goal=goal, met=met))
            print(f"{label + ' ' + name:<62}{t_ours:>11.3f}{_fmt(t_theirs, '.3f'):>11}"
                  f"{_fmt(ratio, '.2f', 'x'):>8}{_fmt(goal, '.2f', 'x'):>8}  "
                  f"{'-' if met is None else 'yes' if met else 'NO'}", file=out, flush=True)

    conv_shapes = CONV_SHAPES if device == "cuda" else CPU_CONV_SHAPES
    pool_shapes, batches = POOL_SHAPES, STEP_BATCHES[device]
    if smoke:
        conv_shapes, pool_shapes, batches = SMOKE["conv"], SMOKE["pool"], (SMOKE["batch"],)
    for shape in conv_shapes:
        label = "conv N,C,H,W,K,k,s,p{} {}".format(",d" if len(shape) > 8 else "",
                                                   ",".join(map(str, shape)))
        report(label, *_conv_cases(shape, xp, torch, device, rng), conv_goal(device, shape))
    for shape in pool_shapes:
        report("pool N,C,H,W,k,s,p " + ",".join(map(str, shape)),
               *_pool_cases(shape, xp, torch, device, rng))
    for batch in batches:
        report(f"LeNet SGD step, batch {batch}", *_step_cases(batch, torch, device, rng),
               STEP_GOAL[device].get(batch))
        step = rows[-1]
        print(f"LeNet images/s: gpucnn {batch / step['gpucnn_ms'] * 1e3:.0f}" +
              (f", torch {batch / step['torch_ms'] * 1e3:.0f}; gpucnn/torch "
               f"{step['torch_ms'] / step['gpucnn_ms']:.2f}x" if step["torch_ms"] else "") +
              f" (batch {batch})", file=out)
        if device == "cuda":  # as `gpucnn train` runs it: one graph launch a step
            report(f"LeNet SGD step in a CUDA graph, batch {batch}",
                   *_graphed_step_cases(batch, torch, rng))
    memory = None
    if device == "cuda":
        batch = SMOKE["batch"] if smoke else MEMORY_BATCH
        mine, theirs = peak_memory(torch, rng, batch)
        ratio = mine / theirs if mine and theirs else None
        memory = dict(batch=batch, gpucnn_mib=mine, torch_mib=theirs, ratio=ratio,
                      goal=MEMORY_GOAL, met=None if ratio is None else ratio <= MEMORY_GOAL)
        print(f"peak memory of a LeNet step, batch {batch}: gpucnn {_fmt(mine, '.1f')} MiB, torch "
              f"{_fmt(theirs, '.1f')} MiB, ratio {_fmt(ratio, '.2f', 'x')} (goal <= {MEMORY_GOAL}x)",
              file=out)
    missed = [r["case"] for r in rows if r["met"] is False]
    if memory and memory["met"] is False:
        missed.append("peak memory")
    print(f"goals met: {sum(r['met'] is True for r in rows) + bool(memory and memory['met'])}, "
          f"missed: {len(missed)}" + (f" ({'; '.join(missed)})" if missed else ""), file=out)
    return dict(meta=meta, rows=rows, memory=memory)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpucnn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case (median)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny case of each kind: checks that everything runs")
    parser.add_argument("--modern", action="store_true", help="only BN, a residual block, the "
                        "ResNet stem pool and a resnet step (which a full run ends with)")
    parser.add_argument("--distributed", action="store_true", help="under mpiexec: data-"
                        "parallel steps on the ranks against one process (gpucnn.tools."
                        "bench_distributed)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be a positive int, got {args.repeat}")
    if args.distributed:
        if args.modern:
            parser.error("--distributed times its own cases; leave --modern out")
        from . import bench_distributed
        return bench_distributed.main(args.device, args.repeat, args.smoke, args.json)
    if args.modern:
        results = run_modern(args.device, args.repeat)
    else:
        results = run(args.device, args.repeat, smoke=args.smoke)
        if not args.smoke:
            results["modern"] = run_modern(args.device, args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)



# --- BN, a residual block, the ResNet step and the ResNet stem's pool ---

def torch_resnet(torch):
    """gpucnn.app.models.resnet written in torch, with the same state_dict names."""
    tn = torch.nn

    class Block(tn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = tn.Sequential(tn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                      tn.BatchNorm2d(cout), tn.ReLU(),
                                      tn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                      tn.BatchNorm2d(cout))
            self.shortcut = (tn.Sequential(tn.Conv2d(cin, cout, 1, stride, bias=False),
                                           tn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else tn.Identity())

        def forward(self, x):
            return self.body(x) + self.shortcut(x)

    class GlobalAvgPool(tn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    def stage(cin, cout, stride):
        return tn.Sequential(Block(cin, cout, stride), tn.ReLU())
    return tn.Sequential(tn.Conv2d(1, 16, 3, padding=1, bias=False), tn.BatchNorm2d(16),
                         tn.ReLU(), stage(16, 16, 1), stage(16, 32, 2), stage(32, 64, 2),
                         GlobalAvgPool(), tn.Linear(64, 10))


def resnet_steps(device, torch, x, y):
    """(ours, theirs or None): the ResNet recipe's SGD step (Nesterov, weight decay) on
    the host batch (x, y), gpucnn's on `device` and torch's beside it."""
    xp = backend.xp_for(device)
    gpucnn.manual_seed(0)
    net = models.resnet().to(device)
    opt = gpucnn.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    xd, yd = xp.asarray(x), xp.asarray(y)
    theirs = None
    if torch is not None:
        dev = "cuda" if device == "cuda" else "cpu"
        tnet = torch_resnet(torch).to(dev)
        topt = torch.optim.SGD(tnet.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                               weight_decay=5e-4)
        tx, ty = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)

        def theirs():
            topt.zero_grad()
            torch.nn.functional.cross_entropy(tnet(tx), ty).backward()
            topt.step()
    return (lambda: training_step(net, opt, xd, yd)), theirs


def run_modern(device="auto", repeat=10, out=sys.stdout):
    """BN forward+backward, a residual block, the 3x3 stride-2 padding-1 max pool of
    ResNet stems, and a resnet SGD step (batch 128) next to torch: [rows]."""
    device, why = backend.resolve_device(device)
    xp, torch, timer = backend.xp_for(device), _torch(device), Timer(device, repeat)
    rng, dev = numpy.random.default_rng(0), "cuda" if device == "cuda" else "cpu"
    arr = lambda *shape: xp.asarray(rng.standard_normal(shape).astype(numpy.float32))  # noqa
    tens = lambda a: torch.from_numpy(backend.to_numpy(a)).to(dev)  # noqa: E731
    cases = []

    x_bn, dy_bn = arr(128, 32, 14, 14), arr(128, 32, 14, 14)
    bn = gpucnn.BatchNorm2D(32).to(device)

    def bn_ours():  # as in a training step (see train_step): one section of gpucnn's threads
        with backend.ops_for(xp).section():
            bn(x_bn)
            bn.backward(dy_bn)
    theirs = None
    if torch is not None:
        tbn = torch.nn.BatchNorm2d(32).to(dev)
        tx_bn, tdy_bn = tens(x_bn).requires_grad_(), tens(dy_bn)
        theirs = lambda: tbn(tx_bn).backward(tdy_bn)  # noqa: E731
    cases.append(("BN2d fwd+bwd 128,32,14,14", bn_ours, theirs))

    gpucnn.manual_seed(0)
    block = models.basic_block(32, 32).to(device)
    x_blk, dy_blk = arr(128, 32, 14, 14), arr(128, 32, 14, 14)

    def block_ours():
        with backend.ops_for(xp).section():
            block.zero_grad()
            block(x_blk)
            block.backward(dy_blk)
    theirs = None
    if torch is not None:
        block_type = type(torch_resnet(torch)[4][0])
        tblock = block_type(32, 32, 1).to(dev)
        tx_blk, tdy_blk = tens(x_blk).requires_grad_(), tens(dy_blk)

        def theirs():
            tblock.zero_grad()
            torch.relu(tblock(tx_blk)).backward(tdy_blk)
    cases.append(("residual block 32ch fwd+bwd 128,32,14,14", block_ours, theirs))

    x_pool, k = arr(128, 16, 28, 28), dict(kernel_size=3, stride=2, padding=1)
    dy_pool = arr(128, 16, 14, 14)

    def pool_ours():
        _, idx = F.max_pool2d(x_pool, **k)
        F.max_pool2d_backward(dy_pool, idx, x_pool.shape, **k)
    theirs = None
    if torch is not None:
        tx_pool, tdy_pool = tens(x_pool).requires_grad_(), tens(dy_pool)
        theirs = lambda: torch.nn.functional.max_pool2d(  # noqa: E731
            tx_pool, 3, 2, 1).backward(tdy_pool)
    cases.append(("max pool 3x3 s2 p1 fwd+bwd 128,16,28,28", pool_ours, theirs))

    step_ours, theirs = resnet_steps(device, torch, rng.standard_normal(
        (128, 1, 28, 28)).astype(numpy.float32), rng.integers(0, 10, 128))
    cases.append(("resnet SGD step, batch 128", step_ours, theirs))

    print(f"gpucnn benchmark (BN, residual block, stem pool, resnet step) on {device} ({why}); float32; median of {repeat}"
          f"{_threads(device, torch)}", file=out)
    rows = []
    for name, ours, theirs in cases:
        t_ours, t_theirs = timer.pair(ours, theirs)
        ratio = t_ours / t_theirs if t_theirs else None
        rows.append(dict(case=name, gpucnn_ms=t_ours, torch_ms=t_theirs, ratio=ratio))
        print(f"{name:<58}{t_ours:>11.3f}{(f'{t_theirs:.3f}' if t_theirs else '-'):>11}"
              f"{(f'{ratio:.2f}x' if ratio else '-'):>8}", file=out, flush=True)
    return rows


if __name__ == "__main__":
    main()
