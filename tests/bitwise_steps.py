#!/usr/bin/env python3
"""Training steps and functional ops, every result saved bit for bit: the evidence that
a change meant to keep behaviour (a redesign, a move of files) kept every bit.

    PYTHONPATH=<repo> python tests/bitwise_steps.py OUT.npz --helpers <repo>/tests

gpucnn is imported from the first entry of PYTHONPATH (the checkout under test); the
stand-in (tests/standin, tests/emulator) from --helpers, test helpers rather than the
package, so an older checkout runs with today's. Only the public API that has not
changed is used (gpucnn.Sequential and the layers, SGD, Adam, CosineAnnealingLR,
Augment, gpucnn.step.train_step, gpucnn.functional, set_num_threads,
backend.set_cupy_module), and the networks are built here, so the script runs
unchanged against any checkout that has that API. .ci/compare-bits runs it on two
checkouts and compares the files array by array.

What is recorded, under keys "<case>/<where>/<what>" (where: cpu1, cpu2 = the CPU with
gpucnn.set_num_threads(1) / (2); standin = the GPU path on the CuPy stand-in, its
kernels the checkout's kernels/*.cu run by the emulator):
- networks (a LeNet-like net; a small ResNet with BatchNorm, residual blocks and a
  strided 1x1 shortcut, global average pool, and a wider one whose CPU passes take
  several chunks, products a sample at a time and the full correlation; a net with
  Dropout, AvgPool2D, dilation and groups), each
  trained a few steps with SGD (Nesterov, weight decay, a cosine schedule stepped per
  batch) or Adam, with or without Augment(padding=2, flip=True), in float32 or
  float64: every step's loss, logits and learning rate; after the last step every
  gradient, every parameter and buffer (state_dict) and the logits of an eval forward;
- functional ops on a few shapes (groups, stride 2, dilation, padding, ceil_mode, a
  non-contiguous input): outputs, indices, gradients, running statistics.
The "meta/..." keys say which files were imported; .ci/compare-bits leaves them out.
About 5 s on two cores (10 s the first time, while the emulator builds the kernels).
"""
import argparse
import importlib
import importlib.util
import os
import pathlib
import sys
import time
import zlib

import numpy


def _checkout():
    """The checkout under test: PYTHONPATH's first entry."""
    entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    if not entries:
        sys.exit("bitwise_steps.py: set PYTHONPATH to the checkout to test (its repository root)")
    root = pathlib.Path(entries[0]).resolve()
    if not (root / "gpucnn" / "__init__.py").is_file():
        sys.exit(f"bitwise_steps.py: no gpucnn/__init__.py under {root} (PYTHONPATH's first entry)")
    return root


def _import_gpucnn(root):
    """import gpucnn from root alone. An editable install of another checkout adds a finder
    that answers for gpucnn's subpackages it maps (gpucnn.kernels -> its kernels/): it is
    taken out, so that the kernels too come from root."""
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "__editable__" not in getattr(f, "__module__", "")
                        and "__editable__" not in repr(f)]
    sys.path.insert(0, str(root))
    import gpucnn
    where = pathlib.Path(gpucnn.__file__).resolve()
    if root not in where.parents:
        sys.exit(f"bitwise_steps.py: gpucnn came from {where}, not from {root}")
    # the .cu sources: package data gpucnn.kernels if root has it, else root/kernels
    kernels = importlib.util.find_spec("gpucnn.kernels")
    for place in (kernels.submodule_search_locations or []) if kernels else []:
        if root not in pathlib.Path(place).resolve().parents:
            sys.exit(f"bitwise_steps.py: gpucnn.kernels came from {place}, not from {root}")
    return gpucnn


# --- the networks, built from the layers alone ------------------------------------------------


def lenet(g):
    return g.Sequential(
        g.Conv2D(1, 6, 5, padding=2), g.ReLU(), g.MaxPool2D(2),
        g.Conv2D(6, 16, 5), g.ReLU(), g.MaxPool2D(2, stride=2),
        g.Flatten(), g.Linear(16 * 2 * 2, 32), g.ReLU(), g.Linear(32, 10))


def _block(g, cin, cout, stride):
    body = g.Sequential(
        g.Conv2D(cin, cout, 3, stride=stride, padding=1, bias=False, init="kaiming_normal"),
        g.BatchNorm2D(cout), g.ReLU(),
        g.Conv2D(cout, cout, 3, padding=1, bias=False, init="kaiming_normal"),
        g.BatchNorm2D(cout))
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = g.Sequential(g.Conv2D(cin, cout, 1, stride=stride, bias=False,
                                         init="kaiming_normal"), g.BatchNorm2D(cout))
    return g.Sequential(g.Residual(body, shortcut), g.ReLU())


def resnet(g, width=8):
    return g.Sequential(
        g.Conv2D(3, width, 3, padding=1, bias=False, init="kaiming_normal"),
        g.BatchNorm2D(width), g.ReLU(), _block(g, width, width, 1), _block(g, width, 2 * width, 2),
        g.GlobalAvgPool2D(), g.Linear(2 * width, 10))


def wide_resnet(g):
    """Wide and large enough for the CPU's chunked passes: several im2col chunks a pass,
    products a sample at a time and a chunk at a time, the full correlation for dx."""
    return resnet(g, 16)


def dropnet(g):
    return g.Sequential(
        g.Conv2D(3, 8, 3, padding=1), g.ReLU(), g.AvgPool2D(2),
        g.Conv2D(8, 8, 3, dilation=2, padding=2, groups=2), g.ReLU(),
        g.AvgPool2D(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        g.Flatten(), g.Dropout(0.3), g.Linear(8 * 3 * 3, 24), g.ReLU(), g.Dropout(0.5),
        g.Linear(24, 10))


# name: (network, input (C, H, W), batch, steps, dtype, optimizer, augment, label smoothing)
NETWORKS = {
    "lenet_sgd_f32": (lenet, (1, 16, 16), 8, 3, "float32", "sgd", False, 0.0),
    "resnet_sgd_aug_f32": (resnet, (3, 8, 8), 8, 3, "float32", "sgd", True, 0.1),
    "resnet_adam_f64": (resnet, (3, 8, 8), 4, 2, "float64", "adam", False, 0.0),
    "resnet_wide_sgd_f32": (wide_resnet, (3, 16, 16), 32, 2, "float32", "sgd", True, 0.0),
    "dropnet_adam_f32": (dropnet, (3, 10, 10), 6, 3, "float32", "adam", True, 0.0),
    "dropnet_sgd_f64": (dropnet, (3, 10, 10), 4, 2, "float64", "sgd", False, 0.0),
}


def train_network(g, name, device, to_device, record):
    build, chw, batch, steps, dtype, opt_name, augment, smoothing = NETWORKS[name]
    g.manual_seed(7)
    model = build(g).to(device=device, dtype=dtype)
    params = model.parameters()
    if opt_name == "sgd":
        opt = g.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        schedule = g.schedules.CosineAnnealingLR(opt, T_max=steps + 1, eta_min=1e-3,
                                                 warmup_steps=1)
    else:
        opt = g.Adam(params, lr=2e-3, weight_decay=1e-4)
        schedule = None
    aug = g.Augment(padding=2, flip=True, seed=11) if augment else None
    rng = numpy.random.default_rng(zlib.crc32(name.encode()))
    for step in range(steps):
        x = rng.standard_normal((batch,) + chw).astype(dtype)
        y = rng.integers(0, 10, batch)
        x, y = to_device(x), to_device(y)
        if aug is not None:
            x = aug(x)
        loss, logits = g.step.train_step(model, opt, x, y, label_smoothing=smoothing)
        record(f"step{step}/loss", loss)
        record(f"step{step}/logits", logits)
        record(f"step{step}/lr", numpy.array(opt.lr, numpy.float64))
        if schedule is not None:
            schedule.step()
    for pname, p in model.named_parameters():
        record(f"grad/{pname}", p.grad)
    for key, value in model.state_dict().items():
        record(f"state/{key}", value)
    model.eval()
    record("eval_logits", model.forward(to_device(rng.standard_normal((batch,) + chw)
                                                  .astype(dtype))))


# --- the functional ops -----------------------------------------------------------------------

# conv: (N, C, H, W), (K, C/groups, R, S), stride, padding, dilation, groups, bias, dtype
CONVS = [
    ((2, 4, 9, 9), (6, 4, 3, 3), 1, 1, 1, 1, True, "float32"),
    ((2, 4, 9, 8), (6, 2, 3, 3), 2, 1, 1, 2, True, "float32"),
    ((3, 3, 10, 10), (4, 3, 3, 2), 1, (2, 1), 2, 1, False, "float64"),
    ((2, 8, 7, 7), (8, 8, 1, 1), 2, 0, 1, 1, False, "float32"),
    ((2, 16, 8, 8), (16, 16, 3, 3), 1, 1, 1, 1, True, "float32"),  # enough channels for
    ((1, 6, 6, 6), (6, 1, 3, 3), 1, "same", 1, 6, True, "float64"),  # the full correlation
]
# pool: (N, C, H, W), kernel, stride, padding, dilation, ceil_mode, dtype
POOLS = [
    ((2, 3, 8, 8), 2, None, 0, 1, False, "float32"),
    ((2, 3, 9, 9), 3, 2, 1, 1, True, "float32"),
    ((1, 2, 11, 10), (3, 2), (2, 1), (1, 0), (2, 1), True, "float64"),
]
# batch norm: (N, C, H, W), training, affine, dtype, transposed input
NORMS = [
    ((4, 3, 5, 5), True, True, "float32", False),
    ((4, 3, 5, 5), False, True, "float64", False),
    ((3, 4, 6, 5), True, False, "float32", True),
]


def functional_ops(g, to_device, record):
    F = g.functional
    rng = numpy.random.default_rng(2024)

    def normal(shape, dtype):
        return rng.standard_normal(shape).astype(dtype)

    for i, (xs, ws, stride, padding, dilation, groups, bias, dtype) in enumerate(CONVS):
        x, w = to_device(normal(xs, dtype)), to_device(normal(ws, dtype))
        b = to_device(normal(ws[:1], dtype)) if bias else None
        y = F.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
        dy = to_device(normal(tuple(y.shape), dtype))
        dx, dw, db = F.conv2d_backward(dy, x, w, stride=stride, padding=padding,
                                       dilation=dilation, groups=groups)
        for what, value in (("y", y), ("dx", dx), ("dw", dw), ("db", db)):
            record(f"conv{i}/{what}", value)
    for i, (xs, k, stride, padding, dilation, ceil, dtype) in enumerate(POOLS):
        x = to_device(normal(xs, dtype))
        y, idx = F.max_pool2d(x, k, stride, padding, dilation, ceil)
        dy = to_device(normal(tuple(y.shape), dtype))
        dx = F.max_pool2d_backward(dy, idx, xs, k, stride, padding, dilation, ceil)
        record(f"maxpool{i}/y", y)
        record(f"maxpool{i}/indices", idx)
        record(f"maxpool{i}/dx", dx)
        for include in (True, False):
            a = F.avg_pool2d(x, k, stride, padding, ceil, count_include_pad=include)
            da = F.avg_pool2d_backward(to_device(normal(tuple(a.shape), dtype)), xs, k, stride,
                                       padding, ceil, count_include_pad=include)
            record(f"avgpool{i}_{include}/y", a)
            record(f"avgpool{i}_{include}/dx", da)
    for i, (xs, training, affine, dtype, transposed) in enumerate(NORMS):
        x = normal(xs, dtype)
        if transposed:  # the same values, not C-contiguous
            x = numpy.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
        C = xs[1]
        mean, var = to_device(normal(C, dtype)), to_device(rng.random(C).astype(dtype) + 0.5)
        w = to_device(normal(C, dtype)) if affine else None
        b = to_device(normal(C, dtype)) if affine else None
        x = to_device(x)
        y, saved = F.batch_norm(x, mean, var, w, b, training=training, momentum=0.2, eps=1e-4)
        dx, dw, db = F.batch_norm_backward(to_device(normal(xs, dtype)), saved, w)
        for what, value in (("y", y), ("dx", dx), ("dw", dw), ("db", db),
                            ("running_mean", mean), ("running_var", var)):
            record(f"batchnorm{i}/{what}", value)
    for dtype in ("float32", "float64"):
        x = normal((5, 3, 4, 4), dtype)
        x[0, 0, 0, :] = (-0.0, 0.0, numpy.inf, -numpy.inf)
        record(f"relu_{dtype}/y", F.relu(to_device(x)))
        a, w, b = normal((6, 7), dtype), normal((4, 7), dtype), normal(4, dtype)
        record(f"linear_{dtype}/y", F.linear(to_device(a), to_device(w), to_device(b)))
        logits, labels = to_device(normal((6, 5), dtype)), to_device(rng.integers(0, 5, 6))
        for smoothing in (0.0, 0.2):
            loss, dlogits = F.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
            record(f"xent_{dtype}_{smoothing}/loss", loss)
            record(f"xent_{dtype}_{smoothing}/dlogits", dlogits)


# --- the runner -------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the .npz to write")
    parser.add_argument("--helpers", default=str(pathlib.Path(__file__).resolve().parent),
                        help="the folder holding standin/ and emulator/ (default: this "
                             "script's folder)")
    parser.add_argument("--no-standin", action="store_true", help="the CPU cases only")
    args = parser.parse_args(argv)

    root = _checkout()
    g = _import_gpucnn(root)
    for sub in ("backend", "functional", "schedules", "step"):  # the names used as g.<sub>
        importlib.import_module(f"gpucnn.{sub}")

    arrays = {}

    def recorder(prefix, to_host):
        def record(key, value):
            key = f"{prefix}/{key}"
            if key in arrays:
                raise KeyError(f"recorded twice: {key}")
            arrays[key] = numpy.array(to_host(value))  # a copy: later steps change arrays
        return record

    def none_or(fn):
        return lambda v: numpy.array("None") if v is None else fn(v)

    started = time.perf_counter()
    timings = {}
    # the FP32 kernels, which every side has: a side whose GPU default is TF32 says so
    if hasattr(g, "set_conv_precision"):
        g.set_conv_precision("fp32")
    wheres = [("cpu1", 1), ("cpu2", 2)] + ([] if args.no_standin else [("standin", None)])
    for where, threads in wheres:
        t0 = time.perf_counter()
        if threads is None:
            sys.path.insert(0, str(pathlib.Path(args.helpers).resolve()))
            import standin
            previous = g.backend.set_cupy_module(standin)
            device, to_device = "cuda", standin.asarray
            to_host = none_or(lambda v: v.get() if isinstance(v, standin.ndarray)
                              else numpy.asarray(v))
            arrays["meta/standin"] = numpy.array(str(pathlib.Path(standin.__file__).resolve()))
        else:
            g.set_num_threads(threads)
            device, to_device = "cpu", (lambda a: a)
            to_host = none_or(numpy.asarray)
        try:
            for name in NETWORKS:
                train_network(g, name, device, to_device,
                              recorder(f"{name}/{where}", to_host))
            functional_ops(g, to_device, recorder(f"functional/{where}", to_host))
        finally:
            if threads is None:
                g.backend.set_cupy_module(previous)
        timings[where] = time.perf_counter() - t0

    arrays["meta/gpucnn"] = numpy.array(str(pathlib.Path(g.__file__).resolve()))
    numpy.savez(args.out, **arrays)
    compared = sum(1 for k in arrays if not k.startswith("meta/"))
    print(f"bitwise_steps.py: gpucnn from {root}: {compared} arrays -> {args.out} in "
          f"{time.perf_counter() - started:.1f} s ("
          + ", ".join(f"{w} {s:.1f} s" for w, s in timings.items()) + ")")


if __name__ == "__main__":
    main()
