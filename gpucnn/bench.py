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

# (N, C, H, W, K, kernel, stride, pad[, dilation])
CONV_SHAPES = [(64, 1, 28, 28, 32, 5, 1, 2), (64, 32, 14, 14, 64, 5, 1, 2),
               (128, 3, 32, 32, 64, 3, 1, 1), (128, 64, 16, 16, 128, 3, 1, 1),
               (64, 16, 32, 32, 32, 3, 2, 1), (64, 16, 32, 32, 32, 3, 1, 2, 2)]
GPU_EXTRA_SHAPES = [(32, 64, 56, 56, 64, 3, 1, 1), (128, 128, 28, 28, 128, 3, 1, 1)]
# (N, C, H, W, kernel, stride, pad): the LeNet's pools and an overlapping one
POOL_SHAPES = [(64, 32, 28, 28, 2, 2, 0), (64, 64, 14, 14, 2, 2, 0), (64, 64, 32, 32, 3, 2, 1)]


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
                import cupy
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                elapsed = lambda e: cupy.cuda.get_elapsed_time(start, e)  # noqa: E731
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
        opt.zero_grad()
        loss, dz = F.softmax_cross_entropy(net(x), y)
        net.backward(dz, need_input_grad=False)
        opt.step()
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


def run(device="auto", repeat=10, out=sys.stdout):
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
    for shape in shapes:
        label = "conv N,C,H,W,K,k,s,p{} {}".format(",d" if len(shape) > 8 else "",
                                                   ",".join(map(str, shape)))
        report(label, *_conv_cases(shape, xp, torch, device, rng))
    for shape in POOL_SHAPES:
        report("pool N,C,H,W,k,s,p " + ",".join(map(str, shape)),
               *_pool_cases(shape, xp, torch, device, rng))
    batch = 256 if device == "cuda" else 64
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
    parser.add_argument("--modern", action="store_true", help="time BN, a residual block, the "
                        "ResNet stem pool and a resnet step instead (issue 11)")
    args = parser.parse_args(argv)
    rows = (run_modern if args.modern else run)(args.device, args.repeat)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()


# --- issue 11: BN, a residual block, the ResNet step and the ResNet stem's pool ---

def torch_resnet(torch):
    """gpucnn.models.resnet written in torch, with the same state_dict names."""
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

    def bn_ours():
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

    gpucnn.manual_seed(0)
    net = models.resnet().to(device)
    opt = gpucnn.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x_net, y_net = arr(128, 1, 28, 28), xp.asarray(rng.integers(0, 10, 128))

    def step_ours():
        opt.zero_grad()
        loss, dz = F.softmax_cross_entropy(net(x_net), y_net)
        net.backward(dz, need_input_grad=False)
        opt.step()
    theirs = None
    if torch is not None:
        tnet = torch_resnet(torch).to(dev)
        topt = torch.optim.SGD(tnet.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                               weight_decay=5e-4)
        tx_net, ty_net = tens(x_net), tens(y_net)

        def theirs():
            topt.zero_grad()
            torch.nn.functional.cross_entropy(tnet(tx_net), ty_net).backward()
            topt.step()
    cases.append(("resnet SGD step, batch 128", step_ours, theirs))

    print(f"gpucnn issue-11 benchmark on {device} ({why}); float32; median of {repeat}",
          file=out)
    rows = []
    for name, ours, theirs in cases:
        t_ours = timer(ours)
        t_theirs = timer(theirs, torch_cuda=True) if theirs else None
        ratio = t_ours / t_theirs if t_theirs else None
        rows.append(dict(case=name, gpucnn_ms=t_ours, torch_ms=t_theirs, ratio=ratio))
        print(f"{name:<58}{t_ours:>11.3f}{(f'{t_theirs:.3f}' if t_theirs else '-'):>11}"
              f"{(f'{ratio:.2f}x' if ratio else '-'):>8}", file=out, flush=True)
    return rows
