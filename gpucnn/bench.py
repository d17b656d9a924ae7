"""Benchmark: each conv pass, both pools and a LeNet training step, next to
PyTorch measured in the same run (where torch is installed), with the ratio.

    python -m gpucnn.bench [--device cpu|cuda|auto] [--repeat N] [--json FILE]

Ratios above 1 mean gpucnn is slower. On the GPU, PyTorch runs with TF32 off
and both sides are timed with CUDA events after warm-up; medians are reported.
"""
import argparse
import json
import statistics
import sys
import time

import numpy

import gpucnn
from . import backend, functional as F, models
from .functional import conv, pool
from .step import train_step

# (N, C, H, W, K, kernel, stride, pad[, dilation])
CONV_SHAPES = [(64, 1, 28, 28, 32, 5, 1, 2), (64, 32, 14, 14, 64, 5, 1, 2),
               (128, 3, 32, 32, 64, 3, 1, 1), (128, 64, 16, 16, 128, 3, 1, 1),
               (64, 16, 32, 32, 32, 3, 2, 1), (64, 16, 32, 32, 32, 3, 1, 2, 2)]
GPU_EXTRA_SHAPES = [(32, 64, 56, 56, 64, 3, 1, 1), (128, 128, 28, 28, 128, 3, 1, 1)]
# (N, C, H, W, kernel, stride, pad): the LeNet's pools and an overlapping one
POOL_SHAPES = [(64, 32, 28, 28, 2, 2, 0), (64, 64, 14, 14, 2, 2, 0), (64, 64, 32, 32, 3, 2, 1)]
# --smoke: one tiny case of each kind, to check that the benchmark runs (tests, CI)
SMOKE = dict(conv=[(2, 3, 8, 8, 4, 3, 1, 1)], pool=[(2, 4, 8, 8, 3, 2, 1)], batch=2)


class Timer:
    """Median wall time of fn() in ms: perf_counter on the CPU, CUDA events on a GPU."""

    def __init__(self, device, repeat, warmup=2):
        self.device, self.repeat, self.warmup = device, repeat, warmup

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
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


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
    return torch


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


def _step_cases(batch, xp, torch, device, rng):
    gpucnn.manual_seed(0)
    net = models.lenet().to(device)
    opt = gpucnn.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = xp.asarray(rng.standard_normal((batch, 1, 28, 28)).astype(numpy.float32))
    y = xp.asarray(rng.integers(0, 10, batch))

    def ours():
        return train_step(net, opt, x, y)
    theirs = None
    if torch is not None:
        dev = "cuda" if device == "cuda" else "cpu"
        nn = torch.nn
        tnet = nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(),
                             nn.Linear(128, 10)).to(dev)
        topt = torch.optim.SGD(tnet.parameters(), lr=0.01, momentum=0.9)
        tx, ty = torch.from_numpy(backend.to_numpy(x)).to(dev), torch.from_numpy(
            backend.to_numpy(y)).to(dev)

        def theirs():
            topt.zero_grad()
            nn.functional.cross_entropy(tnet(tx), ty).backward()
            topt.step()
    return {"training step": ours}, ({"training step": theirs} if theirs else {})


def run(device="auto", repeat=10, out=sys.stdout, smoke=False):
    device, why = backend.resolve_device(device)
    xp = backend.xp_for(device)
    torch = _torch(device)
    timer = Timer(device, repeat)
    rng = numpy.random.default_rng(0)
    print(f"gpucnn {gpucnn.__version__} benchmark on {device} ({why}); float32; median of "
          f"{repeat} runs; torch {'(not installed)' if torch is None else torch.__version__}",
          file=out)
    print(f"{'case':<58}{'gpucnn ms':>11}{'torch ms':>11}{'ratio':>8}", file=out)
    rows = []

    def report(label, ours, theirs):
        for name, fn in ours.items():
            t_ours = timer(fn)
            t_theirs = timer(theirs[name], torch_cuda=True) if name in theirs else None
            ratio = t_ours / t_theirs if t_theirs else None
            rows.append(dict(case=f"{label} {name}", gpucnn_ms=t_ours, torch_ms=t_theirs,
                             ratio=ratio))
            print(f"{label + ' ' + name:<58}{t_ours:>11.3f}"
                  f"{(f'{t_theirs:.3f}' if t_theirs else '-'):>11}"
                  f"{(f'{ratio:.2f}x' if ratio else '-'):>8}", file=out, flush=True)

    shapes = CONV_SHAPES + (GPU_EXTRA_SHAPES if device == "cuda" else [])
    pool_shapes = POOL_SHAPES
    if smoke:
        shapes, pool_shapes = SMOKE["conv"], SMOKE["pool"]
    for shape in shapes:
        label = "conv N,C,H,W,K,k,s,p{} {}".format(",d" if len(shape) > 8 else "",
                                                   ",".join(map(str, shape)))
        report(label, *_conv_cases(shape, xp, torch, device, rng))
    for shape in pool_shapes:
        report("pool N,C,H,W,k,s,p " + ",".join(map(str, shape)),
               *_pool_cases(shape, xp, torch, device, rng))
    batch = SMOKE["batch"] if smoke else 256 if device == "cuda" else 64
    ours, theirs = _step_cases(batch, xp, torch, device, rng)
    report(f"LeNet SGD step, batch {batch}", ours, theirs)
    step = rows[-1]
    print(f"LeNet images/s: gpucnn {batch / step['gpucnn_ms'] * 1e3:.0f}" +
          (f", torch {batch / step['torch_ms'] * 1e3:.0f}" if step["torch_ms"] else ""), file=out)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpucnn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case (median)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny case of each kind: checks that everything runs")
    args = parser.parse_args(argv)
    rows = run(args.device, args.repeat, smoke=args.smoke)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
