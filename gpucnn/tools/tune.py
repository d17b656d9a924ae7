"""`gpucnn tune`: time every tile configuration of the convolution kernels on this
GPU for a model's convolution shapes and remember the fastest per (GPU, pass,
shape, dtype), as JSON in the user's cache directory.

The launchers (gpucnn.backends.cuda.conv.ConvLaunchers.config_for) use a
remembered choice where there is one (gpucnn.backends.cuda.tune_cache), else
heuristic_config. Once a Kernels object has picked a configuration for a shape
it keeps it, so results stay bitwise repeatable within a run; a new tuning
changes the choice (and the rounding) of later runs only.
"""
import time

import numpy

from .. import validate
from ..backends.cuda import conv as cuda_conv, tune_cache
from ..backends.cuda.tune_cache import cache_path, entry_key  # noqa: F401  (tune's names too)
from ..errors import ConfigError, DeviceError


def choices_for(device_name, path=None):
    """{entry_key: configuration} tuned for the GPU named device_name (known
    configurations only)."""
    return tune_cache.choices_for(device_name, path, known=cuda_conv.CONV_CONFIGS)


def model_geometries(model, batch_size):
    """The ConvGeometry of every Conv2D of a built-in model at this batch size, found
    by running the model on the CPU on one image of its input shape (each Conv2D
    keeps its geometry)."""
    from ..app import models
    from ..nn import Conv2D
    if model not in models.MODELS:
        raise ConfigError(f"unknown model {model!r}: choose from "
                          f"{', '.join(sorted(models.MODELS))}")
    batch_size = validate.positive_int(batch_size, "batch size", error=ConfigError)
    spec = models.MODELS[model]
    C, H, W = spec.input_shape
    net = spec.build(num_classes=10, in_channels=C)
    layers = [m for _, m in net.named_modules() if isinstance(m, Conv2D)]
    if not layers:
        return []
    net(numpy.zeros((1, C, H, W), layers[0].weight.data.dtype))
    return list(dict.fromkeys(layer.geometry._replace(N=batch_size) for layer in layers))


def bench_geometries(batch_size=None):
    """The ConvGeometries of gpucnn.tools.bench.CONV_SHAPES: dicts or tuples of
    (N, C, H, W, K, R, S, stride, padding, dilation), or of the older
    (N, C, H, W, K, kernel, stride, padding[, dilation]); GPU_EXTRA_SHAPES too if listed."""
    from . import bench
    from ..functional import conv
    if batch_size is not None:
        batch_size = validate.positive_int(batch_size, "batch size", error=ConfigError)
    shapes = list(getattr(bench, "CONV_SHAPES", [])) + list(getattr(bench, "GPU_EXTRA_SHAPES", []))
    if not shapes:
        raise ConfigError("gpucnn.tools.bench has no CONV_SHAPES list in this version")
    names = ("N", "C", "H", "W", "K", "R", "S", "stride", "padding", "dilation")
    out = []
    for s in shapes:
        if isinstance(s, dict):
            d = dict(s)
        elif len(s) == len(names):
            d = dict(zip(names, s))
        elif len(s) in (8, 9):  # the older form: a square kernel, dilation optional
            d = dict(zip(("N", "C", "H", "W", "K", "R", "stride", "padding", "dilation"), s))
        else:
            raise ConfigError(f"gpucnn.tools.bench.CONV_SHAPES holds {s!r}: expected a dict or "
                              f"a tuple of {', '.join(names)}")
        d.setdefault("S", d["R"])
        g = conv.geometry(numpy.zeros((1, d["C"], d["H"], d["W"]), numpy.float32),
                          numpy.zeros((d["K"], d["C"], d["R"], d["S"]), numpy.float32), None,
                          d.get("stride", 1), d.get("padding", 0), d.get("dilation", 1))
        out.append(g._replace(N=batch_size or d["N"]))
    return list(dict.fromkeys(out))


def _median_ms(xp, run, repeat):
    """Median milliseconds of run() after a warm-up, by CUDA events (by the host's
    clock where xp has no CUDA: the emulated kernels of the tests)."""
    times = []
    run()  # warm-up: compiles and loads the module
    for _ in range(repeat):
        if not hasattr(xp, "cuda"):
            t0 = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = xp.cuda.Event(), xp.cuda.Event()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, end))
    return float(numpy.median(times))


def time_configs(kernels, g, dtype, repeat=5, precision="fp32"):
    """{pass: {configuration: median milliseconds}} for one shape on kernels' device, at
    one precision (a tensor-core precision times the tensor-core builds)."""
    xp = kernels.xp
    rng = numpy.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((g.N, g.C, g.H, g.W)).astype(dtype))
    w = xp.asarray(rng.standard_normal((g.K, g.C // g.groups, g.R, g.S)).astype(dtype))
    dy = xp.asarray(rng.standard_normal((g.N, g.K, g.P, g.Q)).astype(dtype))
    p = precision
    calls = {"forward": lambda c: kernels.conv2d_forward(x, w, None, g, config=c, precision=p),
             "backward_data": lambda c: kernels.conv2d_backward_data(dy, w, g, config=c,
                                                                     precision=p),
             "backward_filter": lambda c: kernels.conv2d_backward_filter(dy, x, g, config=c,
                                                                         precision=p)}
    return {p: {c: _median_ms(xp, lambda: call(c), repeat) for c in cuda_conv.CONV_CONFIGS}
            for p, call in calls.items()}


def tune(kernels, geometries, dtypes=(numpy.float32,), repeat=5, path=None, report=print,
         precisions=("fp32",)):
    """Time every configuration for every shape, pass, dtype and precision (float32's:
    fp32, tf32, 3xtf32; float64 computes in FP64 only) on kernels' device and store the
    fastest under the device's name; returns {entry_key: configuration}."""
    if not kernels.device_name:
        raise DeviceError("gpucnn tune needs a GPU whose name CuPy reports")
    chosen = {}
    runs = [(d, p) for d in dtypes for p in precisions
            if p == "fp32" or numpy.dtype(d) == numpy.float32]
    for g in geometries:
        for dtype, precision in runs:
            for pass_, times in time_configs(kernels, g, dtype, repeat, precision).items():
                best = min(times, key=times.get)
                key = entry_key(pass_, g, dtype, precision)
                chosen[key] = best
                heuristic = cuda_conv.heuristic_config(pass_, g)
                report(f"{key}: {best} {times[best]:.3f} ms (heuristic {heuristic} "
                       f"{times[heuristic]:.3f} ms)")
    tune_cache.save(kernels.device_name, chosen, path)
    return chosen
