"""`gpucnn tune`: time every tile configuration of the convolution kernels on this
GPU for a model's convolution shapes and remember the fastest per (GPU, pass,
shape, dtype), as JSON in the user's cache directory.

The launchers (gpucnn.cuda.Kernels.config_for) use a remembered choice where there
is one, else cuda.heuristic_config. Once a Kernels object has picked a
configuration for a shape it keeps it, so results stay bitwise repeatable within
a run; a new tuning changes the choice (and the rounding) of later runs only.
"""
import json
import os
import pathlib
import tempfile
import time

import numpy

from ..backends.cuda import kernels as cuda
from ..errors import ConfigError, DeviceError


def cache_path():
    """$XDG_CACHE_HOME/gpucnn/tune.json, else ~/.cache/gpucnn/tune.json."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "gpucnn" / "tune.json"


def _load(path):
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):  # missing or unreadable: nothing tuned yet
        return {}
    return data if isinstance(data, dict) else {}


def _save(data, path):
    """Write atomically: a reader sees the old file or the new one, never half."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def entry_key(pass_, g, dtype):
    """The key of one tuned choice within a GPU's entries, e.g.
    'forward N64 C1 H28 W28 K32 R5 S5 stride1x1 pad2,2,2,2 dil1x1 g1 float32'."""
    return (f"{pass_} N{g.N} C{g.C} H{g.H} W{g.W} K{g.K} R{g.R} S{g.S} "
            f"stride{g.sh}x{g.sw} pad{g.pt},{g.pb},{g.pl},{g.pr} dil{g.dh}x{g.dw} "
            f"g{g.groups} {numpy.dtype(dtype).name}")


def choices_for(device_name, path=None):
    """{entry_key: configuration} tuned for the GPU named device_name."""
    entries = _load(path or cache_path()).get(device_name, {})
    return {k: v for k, v in entries.items() if v in cuda.CONV_CONFIGS}


INPUT_SIZES = {"lenet": 28, "digits": 8}  # a built-in model's image side (else 32)


def model_geometries(model, batch_size):
    """The ConvGeometry of every Conv2D of a built-in model at this batch size, found
    by running the model on the CPU on one image (each Conv2D keeps its geometry)."""
    from ..app import models
    from ..nn import Conv2D
    if model not in models.MODELS:
        raise ConfigError(f"unknown model {model!r}: choose from {', '.join(sorted(models.MODELS))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive int, got {batch_size!r}")
    net = models.MODELS[model]()
    layers = []

    def walk(m):
        if isinstance(m, Conv2D):
            layers.append(m)
        for child in m.children():
            walk(child)
    walk(net)
    if not layers:
        return []
    size = INPUT_SIZES.get(model, 32)
    net(numpy.zeros((1, layers[0].in_channels, size, size), layers[0].weight.data.dtype))
    return list(dict.fromkeys(layer.geometry._replace(N=batch_size) for layer in layers))


def bench_geometries(batch_size=None):
    """The ConvGeometries of gpucnn.tools.bench.CONV_SHAPES: dicts or tuples of
    (N, C, H, W, K, R, S, stride, padding, dilation), or of the older
    (N, C, H, W, K, kernel, stride, padding[, dilation]); GPU_EXTRA_SHAPES too if listed."""
    from . import bench
    from ..functional import conv
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ConfigError(f"batch size must be a positive int, got {batch_size!r}")
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
            raise ConfigError(f"gpucnn.tools.bench.CONV_SHAPES holds {s!r}: expected a dict or a tuple "
                             f"of {', '.join(names)}")
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


def time_configs(kernels, g, dtype, repeat=5):
    """{pass: {configuration: median milliseconds}} for one shape on kernels' device."""
    xp = kernels.xp
    rng = numpy.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((g.N, g.C, g.H, g.W)).astype(dtype))
    w = xp.asarray(rng.standard_normal((g.K, g.C // g.groups, g.R, g.S)).astype(dtype))
    dy = xp.asarray(rng.standard_normal((g.N, g.K, g.P, g.Q)).astype(dtype))
    calls = {"forward": lambda c: kernels.conv2d_forward(x, w, None, g, config=c),
             "backward_data": lambda c: kernels.conv2d_backward_data(dy, w, g, config=c),
             "backward_filter": lambda c: kernels.conv2d_backward_filter(dy, x, g, config=c)}
    return {p: {c: _median_ms(xp, lambda: call(c), repeat) for c in cuda.CONV_CONFIGS}
            for p, call in calls.items()}


def tune(kernels, geometries, dtypes=(numpy.float32,), repeat=5, path=None, report=print):
    """Time every configuration for every shape, pass and dtype on kernels' device and
    store the fastest under the device's name; returns {entry_key: configuration}."""
    if not kernels.device_name:
        raise DeviceError("gpucnn tune needs a GPU whose name CuPy reports")
    chosen = {}
    for g in geometries:
        for dtype in dtypes:
            for pass_, times in time_configs(kernels, g, dtype, repeat).items():
                best = min(times, key=times.get)
                key = entry_key(pass_, g, dtype)
                chosen[key] = best
                heuristic = cuda.heuristic_config(pass_, g)
                report(f"{key}: {best} {times[best]:.3f} ms (heuristic {heuristic} "
                       f"{times[heuristic]:.3f} ms)")
    path = path or cache_path()
    data = _load(path)
    data.setdefault(kernels.device_name, {}).update(chosen)
    _save(data, path)
    return chosen
