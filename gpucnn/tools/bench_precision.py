"""`gpucnn bench --precision`: each float32 convolution precision (docs/precision.md)
against cuDNN with the matching setting, time and accuracy, plus the LeNet and ResNet
steps with both libraries' defaults.

    python -m gpucnn.tools.bench_precision [--precision fp32,tf32,3xtf32] [--device cuda]
        [--repeat N] [--smoke] [--json FILE]       (gpucnn bench --precision [LIST])

For every 3x3 benchmark shape with C and K >= 64 (and LeNet's layers), each pass at
each precision is timed (CUDA events, median after warm-up) next to PyTorch with
``torch.backends.cudnn.allow_tf32`` True for ``tf32`` and False for ``fp32`` and
``3xtf32`` (the FP32 accuracy it stands in for), and its error is measured against
float64 (||y - y64|| / ||y64||, PyTorch's float64 convolution on the same inputs).
Goals: ``tf32`` within 1.3x cuDNN's TF32 time, ``3xtf32`` at most 0.7x cuDNN's FP32
time on the 3x3 layers with C and K >= 64; the LeNet (batch 256) and ResNet
(batch 128) steps at each library's default faster than PyTorch eager.
On the CPU only ``fp32`` exists (the table says so); the check then runs at the
smoke size so that the script cannot rot.
"""
import argparse
import contextlib
import json
import sys

import numpy

import gpucnn
from .. import backend, functional as F
from ..backends import precision as precisions
from ..functional import conv
from . import bench

GOALS = {"tf32": 1.3, "3xtf32": 0.7}  # time ratio to cuDNN with the matching setting
PASSES = ("forward", "backward-data", "backward-filter")


def _shapes(device, smoke):
    if smoke or device != "cuda":
        return bench.SMOKE["conv"]
    wide = [s for s in bench.CONV_SHAPES if s[5] == 3 and min(s[1], s[4]) >= 64]
    return bench._lenet_convs(256) + wide


def _goal(shape, p):
    return GOALS.get(p) if shape[5] == 3 and min(shape[1], shape[4]) >= 64 else None


def _passes(shape, xp, rng):
    N, C, H, W, K, k, s, p, *d = shape
    kw = dict(stride=s, padding=p, dilation=d[0] if d else 1)
    x = rng.standard_normal((N, C, H, W)).astype(numpy.float32)
    w = (rng.standard_normal((K, C, k, k)) * 0.1).astype(numpy.float32)
    g = conv.geometry(x, w, None, **kw)
    dy = rng.standard_normal((N, K, g.P, g.Q)).astype(numpy.float32)
    xd, wd, dyd = (xp.asarray(a) for a in (x, w, dy))
    ours = {"forward": lambda: F.conv2d(xd, wd, **kw),
            "backward-data": lambda: conv.backward_data(dyd, wd, g),
            "backward-filter": lambda: conv.backward_filter(dyd, xd, g)}
    return (x, w, dy, kw), ours


def _torch_passes(torch, dev, arrays, dtype):
    x, w, dy, kw = arrays
    tx, tw, tdy = (torch.from_numpy(a).to(dev, dtype) for a in (x, w, dy))
    s, p, d = kw["stride"], kw["padding"], kw["dilation"]
    args = ([s, s], [p, p], [d, d], False, [0, 0], 1)
    back = torch.ops.aten.convolution_backward
    return {"forward": lambda: torch.nn.functional.conv2d(tx, tw, None, s, p, d),
            "backward-data": lambda: back(tdy, tx, tw, None, *args, [True, False, False])[0],
            "backward-filter": lambda: back(tdy, tx, tw, None, *args, [False, True, False])[1]}


def _error(got, exact):
    got = numpy.asarray(backend.to_numpy(got), numpy.float64)
    return float(numpy.linalg.norm(got - exact) / (numpy.linalg.norm(exact) or 1.0))


def _cudnn(torch, dev, allow_tf32):
    """cuDNN's settings for a block (its flags() context, which PyTorch requires where
    a test harness has frozen the global flags); nothing off a GPU."""
    if torch is None or dev != "cuda":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False,
                                      allow_tf32=allow_tf32)


def _measure(torch, dev, timer, arrays, ours, p):
    """{pass: row} for one shape at precision p."""
    theirs, exact = {}, {}
    if torch is not None:
        theirs = _torch_passes(torch, dev, arrays, torch.float32)
        exact = {k: f().double().cpu().numpy() for k, f in
                 _torch_passes(torch, dev, arrays, torch.float64).items()}
    rows = {}
    with gpucnn.conv_precision(p), _cudnn(torch, dev, allow_tf32=p == "tf32"):
        for name in PASSES:
            t_ours, t_theirs = timer.pair(ours[name], theirs.get(name))
            rows[name] = dict(gpucnn_ms=t_ours, torch_ms=t_theirs,
                              ratio=t_ours / t_theirs if t_theirs else None,
                              gpucnn_error=_error(ours[name](), exact[name]) if exact else None,
                              torch_error=(_error(theirs[name]().cpu().numpy(), exact[name])
                                           if exact else None))
    return rows


def run(device="auto", repeat=10, smoke=False, out=None, which=precisions.PRECISIONS):
    """Every shape at every precision; prints the table, returns {"meta", "rows"}."""
    out = out or sys.stdout
    device, why = backend.resolve_device(device)
    xp, torch = backend.xp_for(device), bench._torch(device)
    timer, rng = bench.Timer(device, repeat, warmup=3), numpy.random.default_rng(0)
    dev = "cuda" if device == "cuda" else "cpu"
    which = [p for p in which if device == "cuda" or p == "fp32"]
    print(f"gpucnn conv precisions on {device} ({why}): {', '.join(which)}"
          f"{'' if device == 'cuda' else ' (the tensor-core precisions apply on a GPU only)'}"
          f"; median of {repeat}; error = ||y - y64|| / ||y64||", file=out)
    print(f"{'case':<52}{'prec':>7}{'ours ms':>9}{'torch ms':>9}{'ratio':>7}{'goal':>6}"
          f"{'our err':>10}{'torch err':>10}", file=out)
    rows = []
    for shape in _shapes(device, smoke):
        arrays, ours = _passes(shape, xp, rng)
        for p in which:
            for name, r in _measure(torch, dev, timer, arrays, ours, p).items():
                goal = None if smoke else _goal(shape, p)
                met = None if goal is None or r["ratio"] is None else r["ratio"] <= goal
                rows.append(dict(case=f"conv {','.join(map(str, shape))} {name}", precision=p,
                                 goal=goal, met=met, **r))
                print(f"{rows[-1]['case']:<52}{p:>7}{r['gpucnn_ms']:>9.3f}"
                      f"{bench._fmt(r['torch_ms'], '.3f'):>9}{bench._fmt(r['ratio'], '.2f', 'x'):>7}"
                      f"{bench._fmt(goal, '.1f', 'x'):>6}{bench._fmt(r['gpucnn_error'], '.1e'):>10}"
                      f"{bench._fmt(r['torch_error'], '.1e'):>10}", file=out, flush=True)
    with _cudnn(torch, dev, allow_tf32=True):  # PyTorch's default, for the steps
        rows += _default_steps(device, repeat, smoke, out, torch, timer, rng)
    return dict(meta=dict(device=device, precisions=which, smoke=smoke), rows=rows)


def _default_steps(device, repeat, smoke, out, torch, timer, rng):
    """The LeNet (batch 256) and ResNet (batch 128) steps with each library's defaults
    (gpucnn: tf32 on a GPU; PyTorch: cuDNN's TF32 convolutions), goal: faster."""
    rows = []
    previous = gpucnn.set_conv_precision(None)
    try:
        for name, batch in (("LeNet", 256), ("ResNet", 128)):
            batch = bench.SMOKE["batch"] if smoke else batch
            x, y = bench._step_batch(batch, rng)
            if name == "ResNet":
                ours, theirs = bench.resnet_steps(device, torch, x, y)
            else:
                ours = bench._our_step(device, x, y)
                theirs = bench._their_step(torch, device, x, y) if torch is not None else None
            t_ours, t_theirs = timer.pair(ours, theirs)
            ratio = t_ours / t_theirs if t_theirs else None
            rows.append(dict(case=f"{name} SGD step, batch {batch}, defaults",
                             precision="default", gpucnn_ms=t_ours, torch_ms=t_theirs,
                             ratio=ratio, goal=1.0,
                             met=None if ratio is None or smoke else ratio <= 1.0))
            print(f"{rows[-1]['case']:<52}{'default':>7}{t_ours:>9.3f}"
                  f"{bench._fmt(t_theirs, '.3f'):>9}{bench._fmt(ratio, '.2f', 'x'):>7}"
                  f"{bench._fmt(None if smoke else 1.0, '.1f', 'x'):>6}", file=out, flush=True)
    finally:
        gpucnn.set_conv_precision(previous)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpucnn bench --precision",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case (median)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape: checks that it runs")
    parser.add_argument("--precision", default=",".join(precisions.PRECISIONS), metavar="LIST",
                        help="the precisions to time, comma-separated (default all three)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be a positive int, got {args.repeat}")
    which = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not which or any(p not in precisions.PRECISIONS for p in which):
        parser.error(f"--precision takes a comma-separated list of "
                     f"{', '.join(precisions.PRECISIONS)}, got {args.precision!r}")
    results = run(args.device, args.repeat, args.smoke, which=which)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
