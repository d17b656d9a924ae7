"""The Python steps of ``.ci/gpu-check`` (the one call made on a lent GPU).

    python -m gpucnn.tools.gpucheck preflight
    python -m gpucnn.tools.gpucheck versions
    python -m gpucnn.tools.gpucheck compile [--jobs N]
    python -m gpucnn.tools.gpucheck cuda-skips JUNIT_XML
    python -m gpucnn.tools.gpucheck sanitizer-log LOG
    python -m gpucnn.tools.gpucheck determinism --device cuda [--batch 64] [--steps 20]
    python -m gpucnn.tools.gpucheck data-parallel [--batch 32] [--steps 8]
    python -m gpucnn.tools.gpucheck train-report RUN_DIR [--min-accuracy 0.87]

Each prints what it found and exits nonzero when its check fails. Loaded as a
pytest plugin (``pytest -p gpucnn.tools.gpucheck``) it turns CuPy's memory pool off,
so that every array is its own cudaMalloc and compute-sanitizer's memcheck sees
an out-of-bounds access that the pool would hide inside a larger chunk.
"""
import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import time
from xml.etree import ElementTree

import numpy

import gpucnn
from .. import backend
from ..backends import cuda, precision
from .. import distributed
from ..distributed.comm import nccl_module
from ..backends.cuda.graph import GraphedStep
from . import bench, nvrtc
from ..app import models

UNAVAILABLE = 78  # exit status of a check this machine cannot run (not a failed proof)


def preflight(out=None):
    """The few seconds' check before a GPU run: CuPy and PyTorch import, and CuPy runs a
    kernel on a device. Returns True when all hold; prints what is missing."""
    out = out or sys.stdout
    ok = True
    for name in ("cupy", "torch"):
        try:
            module = __import__(name)
            print(f"{name} {module.__version__}: imports", file=out)
        except Exception as e:  # an ImportError, or a CUDA library that fails to load
            print(f"{name}: does not import ({type(e).__name__}: {e})", file=out)
            ok = False
    if ok and not backend.cuda_available():
        print(f"no usable GPU: {backend.cuda_unavailable_reason()}", file=out)
        ok = False
    if ok:
        import torch
        print(f"CuPy ran a kernel on the GPU; PyTorch sees "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} GPU(s)",
              file=out)
        ok = torch.cuda.is_available()
    print(f"preflight: {'pass' if ok else 'FAIL: the GPU steps cannot run here'}", file=out)
    return ok


def _tool_version(command):
    """The last line of `command --version`, or why there is none."""
    if shutil.which(command[0]) is None:
        return "not found"
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"failed ({e})"
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def versions(out=None):
    """Print the GPU, driver, CUDA, CuPy, PyTorch and tool versions; return the GPU's name
    ('none' without one)."""
    out = out or sys.stdout
    print(f"gpucnn {gpucnn.__version__}, Python {platform.python_version()}, "
          f"NumPy {numpy.__version__}", file=out)
    name = "none"
    if backend.cuda_available():
        cp = backend.xp_for("cuda")
        rt = cp.cuda.runtime
        props = rt.getDeviceProperties(rt.getDevice())
        name = props["name"].decode()
        print(f"GPU: {name}, compute capability {props['major']}.{props['minor']}, "
              f"{props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.1f} GiB",
              file=out)
        print(f"CUDA driver API {rt.driverGetVersion()}, runtime {rt.runtimeGetVersion()}, "
              f"CuPy {cp.__version__}", file=out)
    else:
        print(f"GPU: none ({backend.cuda_unavailable_reason()})", file=out)
    print(f"nvidia-smi: {_tool_version(['nvidia-smi', '--query-gpu=name,driver_version', '--format=csv,noheader'])}",  # noqa: E501
          file=out)
    try:
        import torch
        print(f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
              f"{torch.backends.cudnn.version() if torch.cuda.is_available() else '-'}", file=out)
    except ImportError:
        print("PyTorch: not installed", file=out)
    print(f"nvcc: {_tool_version(['nvcc', '--version'])}", file=out)
    print(f"compute-sanitizer: {_tool_version(['compute-sanitizer', '--version'])}", file=out)
    return name


# A skipped test is a cuda one when it runs on the device 'cuda' (a `cuda` part in its
# parameter id, as DEVICES gives) or its reason is the GPU's absence (conftest: "no CUDA
# device here: ..."; backend: "CuPy ..."). A test's *name* may say cuda and skip by design
# where a GPU exists (test_cuda_missing_is_a_clear_error): its name alone does not count.
_GPU_REASON = re.compile(r"no CUDA device|CuPy", re.IGNORECASE)
_CUDA_PARAM = re.compile(r"\[(?:[^\]]*-)?cuda(?:-[^\]]*)?\]$")


def cuda_skips(junit_xml):
    """'test id: reason' of each skipped cuda test in a pytest --junitxml report."""
    found = []
    for case in ElementTree.parse(junit_xml).iter("testcase"):
        skipped = case.find("skipped")
        if skipped is None:
            continue
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        reason = skipped.get("message", "")
        if _CUDA_PARAM.search(case.get("name", "")) or _GPU_REASON.search(reason):
            found.append(f"{name}: {reason}")
    return found


# compute-sanitizer's words where it cannot attach to this machine's device or driver
# (seen: "Device not supported", then CUDA error 999). Read from the log of a probe that
# runs one trivial CuPy kernel, where they cannot come from a hazard in gpucnn's kernels.
_SANITIZER_UNAVAILABLE = re.compile(
    r"Device not supported|error 999|CUDA_ERROR_UNKNOWN|cudaErrorUnknown"
    r"|not supported on this (?:device|platform)",
    re.IGNORECASE)


def sanitizer_unavailable(text):
    """The line of a compute-sanitizer probe's log that says it cannot run on this
    machine, or None where it ran."""
    for line in text.splitlines():
        if _SANITIZER_UNAVAILABLE.search(line):
            return line.strip()
    return None


def _compile_unit(index, gpu):
    """Compile compile unit `index` (in a process of its own): on a GPU through CuPy's
    RawModule and loaded, as the loader does, so CuPy's disk cache then holds it for
    every later process; without one through NVRTC alone. Returns (label, seconds, error)."""
    unit = cuda.compile_units()[index]
    label = f"kernels/{unit.filename} ({unit.config})"
    start = time.perf_counter()
    try:
        if gpu:
            cp = backend.xp_for("cuda")
            module = cp.RawModule(code=cuda.source(unit.filename), options=unit.options,
                                  name_expressions=unit.name_expressions)
            for name in unit.name_expressions:
                module.get_function(name)
            error = None
        else:
            good, log, _ = nvrtc.compile(cuda.source(unit.filename), unit.name_expressions,
                                         options=unit.options, filename=unit.filename)
            error = None if good else log
    except Exception as e:  # CuPy's CompileException holds NVRTC's log
        error = f"{type(e).__name__}: {e}"
    return label, time.perf_counter() - start, error


def compile_all(jobs=None, files=None, gpu=None, out=None):
    """Every compile unit of the kernels (of `files` only, if given) at once, one process
    each (up to `jobs`), so the steps after it find them compiled: loaded on the GPU if
    `gpu` (default: where CuPy sees one), else by NVRTC alone. Returns True when all
    compile; UNAVAILABLE where neither a GPU nor NVRTC is here."""
    out = out or sys.stdout
    gpu = backend.cuda_available() if gpu is None else gpu
    if not gpu and nvrtc.library() is None:
        print("compile: no GPU and no NVRTC here", file=out)
        return UNAVAILABLE
    chosen = [i for i, u in enumerate(cuda.compile_units()) if not files or u.filename in files]
    if not chosen:
        print(f"compile: no compile unit of {', '.join(files)}", file=out)
        return False
    count = len(chosen)
    jobs = jobs or min(count, os.cpu_count() or 1)
    start = time.perf_counter()
    # spawn, not fork: a forked child cannot use the CUDA context of its parent
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_unit, chosen, [gpu] * count))
    for label, seconds, error in results:
        print(f"{label}: {'FAILS' if error else 'compiles'} ({seconds:.1f} s)"
              + (f"\n{error}" if error else ""), file=out)
    failed = sum(error is not None for _, _, error in results)
    how = "compiled and loaded on the GPU" if gpu else "compiled by NVRTC"
    print(f"{count} compile units {how} in {time.perf_counter() - start:.1f} s, {jobs} processes: "
          f"{'FAIL' if failed else 'pass'}", file=out)
    return not failed


def _lenet_run(device, dtype, batch, steps, seed=0, make_step=None):
    """Train a seeded LeNet with SGD + momentum for `steps` steps on a fixed stream of
    random batches; return its parameters as host arrays. make_step(net, opt): the
    function that trains on one batch (x, y) (default: bench.training_step)."""
    gpucnn.manual_seed(seed)
    net = models.lenet().to(device, dtype)
    opt = gpucnn.SGD(net.parameters(), lr=0.05, momentum=0.9)
    step = (make_step or _plain_step)(net, opt)
    rng = numpy.random.default_rng(seed)
    for _ in range(steps):
        x = backend.to_device(rng.standard_normal((batch, 1, 28, 28)).astype(dtype), device)
        y = backend.to_device(rng.integers(0, 10, batch), device)
        step(x, y)
    return {k: backend.to_numpy(v) for k, v in net.state_dict().items()}


def _plain_step(net, opt):
    return functools.partial(bench.training_step, net, opt)


# One step's update (weights after minus before) in float32 against float64, from the
# same weights: ‖a-b‖/‖b‖ per tensor, per conv precision. FP32 arithmetic (and 3xTF32's)
# lands far under 1e-3; TF32 rounds every conv operand to 2^-11, which a step's update
# carries at the 1e-3 to 1e-2 level (docs/precision.md).
PARITY_RTOL = {"fp32": 1e-3, "3xtf32": 1e-3, "tf32": 3e-2}


def determinism(device, batch=64, steps=20, out=None):
    """At each conv precision the device has: two identical training runs must give the
    same bits, and one float32 step on the device must match a float64 step on the CPU.
    Returns True when all hold."""
    out = out or sys.stdout
    device, why = backend.resolve_device(device)
    print(f"determinism and parity on {device} ({why}): LeNet, SGD momentum 0.9, "
          f"batch {batch}", file=out)
    ok = True
    for p in (precision.PRECISIONS if device == "cuda" else ("fp32",)):
        with gpucnn.conv_precision(p):
            ok = _determinism_at(p, device, batch, steps, out) and ok
    return ok


def _determinism_at(p, device, batch, steps, out):
    first = _lenet_run(device, numpy.float32, batch, steps)
    second = _lenet_run(device, numpy.float32, batch, steps)
    differ = [k for k in first if not numpy.array_equal(first[k], second[k])]
    print(f"[{p}] two runs of {steps} steps: " + ("bitwise equal" if not differ else
                                                  f"DIFFER in {', '.join(differ)}"), file=out)
    ours = _lenet_run(device, numpy.float32, batch, 1)
    with gpucnn.conv_precision("fp32"):  # the float64 reference: the CPU has no other
        start = _lenet_run("cpu", numpy.float64, batch, 0)
        ref = _lenet_run("cpu", numpy.float64, batch, 1)
    worst = 0.0
    for k in ref:
        update, ref_update = ours[k] - start[k], ref[k] - start[k]
        err = float(numpy.linalg.norm(update - ref_update) / numpy.linalg.norm(ref_update))
        worst = max(worst, err)
        print(f"  {k:<20} relative error of one step's update {err:.2e}", file=out)
    parity = worst <= PARITY_RTOL[p] and numpy.isfinite(worst)
    print(f"[{p}] one float32 step on {device} vs float64 on cpu: worst {worst:.2e} "
          f"(limit {PARITY_RTOL[p]:g}): {'pass' if parity else 'FAIL'}", file=out)
    return not differ and parity


def data_parallel(batch=32, steps=8, out=None):
    """The data-parallel step on this one GPU: the GradientReducer's buckets summed by
    NCCL (a communicator of one rank), eagerly and replayed from a CUDA graph, against
    the plain step, eager and graphed. One rank's sum is its own gradient and 1/R is
    1, so all four runs must end on the same bits, and both graphed runs must have
    captured their step: the reducer's buckets, events and streams under capture, as
    a run of several GPUs replays them (NCCL's own kernels need two GPUs: one rank's
    in-place sum queues nothing). Returns True when all hold, UNAVAILABLE where
    CuPy has no NCCL."""
    out = out or sys.stdout
    try:
        nccl_module()
    except distributed.DistributedError as e:
        print(f"NCCL unavailable on this machine ({e})", file=out)
        return UNAVAILABLE
    world = distributed.get_world()
    print(f"data parallel on one GPU: world of {world.size}, NCCL "
          f"{distributed.nccl_version()}, LeNet, batch {batch}, {steps} steps", file=out)
    graphed = []  # the GraphedSteps made, each asked afterwards whether it captured

    def run(reduce, graph):
        def make_step(net, opt):
            step = gpucnn.train_step
            if reduce:
                xp = backend.get_array_module(net.parameters()[0].data)
                comm = distributed.NcclCommunicator(world, xp)
                step = functools.partial(step, reducer=distributed.GradientReducer(net, comm))
            if not graph:
                return lambda x, y: step(net, opt, x, y)
            graphed.append(GraphedStep(net, opt, step=step,
                                       log=lambda line: print(line, file=out)))
            return graphed[-1]
        return _lenet_run("cuda", numpy.float32, batch, steps, make_step=make_step)

    states = {f"{'NCCL' if reduce else 'plain'}, {'graphed' if graph else 'eager'}":
              run(reduce, graph) for reduce in (False, True) for graph in (False, True)}
    captured = [g.graph is not None and backend.graph_capture_replays(g.xp) for g in graphed]
    ok = all(captured)
    print(f"graphed runs replayed a captured step: {captured}", file=out)
    reference = states["plain, eager"]
    for name, state in states.items():
        differ = [k for k in reference if not numpy.array_equal(reference[k], state[k])]
        print(f"{name:<15} " + ("bitwise equal to plain, eager" if not differ else
                                f"DIFFERS from plain, eager in {', '.join(differ)}"), file=out)
        ok = ok and not differ
    print(f"data parallel on one GPU: {'pass' if ok else 'FAIL'}", file=out)
    return ok


def train_report(run_dir, min_accuracy=None, out=None):
    """Print each epoch's test accuracy and images/s from a run's metrics.jsonl; True
    unless the last accuracy is below min_accuracy."""
    out = out or sys.stdout
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        print(f"epoch {r['epoch']}: test accuracy {100 * r['test_accuracy']:.2f}%, "
              f"{r['images_per_s']:.0f} images/s", file=out)
    if not rows:
        print(f"{path} holds no epoch", file=out)
        return False
    last = rows[-1]["test_accuracy"]
    good = min_accuracy is None or last >= min_accuracy
    print(f"final test accuracy {100 * last:.2f}%" + (
        "" if min_accuracy is None else f" (needs >= {100 * min_accuracy:.1f}%): "
        f"{'pass' if good else 'FAIL'}"), file=out)
    return good


def pytest_configure(config):
    """As a pytest plugin: no CuPy memory pool (see the module docstring)."""
    try:
        import cupy
    except ImportError:
        return
    cupy.cuda.set_allocator(None)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpucnn.tools.gpucheck", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("preflight", help="CuPy and PyTorch import and a GPU runs a kernel")
    sub.add_parser("versions", help="GPU, driver, CUDA, CuPy, PyTorch, nvcc, compute-sanitizer")
    c = sub.add_parser("compile", help="every kernel compile unit, in parallel processes")
    c.add_argument("--jobs", type=int, help="processes (default: one per unit, up to the CPUs)")
    c.add_argument("--files", nargs="+", help="only these kernels/*.cu (default: every one)")
    c.add_argument("--nvrtc", action="store_true", help="compile with NVRTC alone, even where "
                   "there is a GPU (the processes of a test's CuPy stand-in have none)")
    g = sub.add_parser("sanitizer-log", help=f"exit {UNAVAILABLE} if a compute-sanitizer log "
                       "says it cannot run on this machine")
    g.add_argument("log")
    s = sub.add_parser("cuda-skips", help="fail if a pytest --junitxml report has a skipped "
                       "cuda test")
    s.add_argument("junit_xml")
    d = sub.add_parser("determinism", help="two runs bitwise equal; one step vs float64 on cpu")
    d.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--steps", type=int, default=20)
    m = sub.add_parser("data-parallel", help="one rank's NCCL gradient all-reduce, eager "
                       "and in a CUDA graph, bitwise equal to the plain step")
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--steps", type=int, default=8)
    t = sub.add_parser("train-report", help="accuracy and images/s of a gpucnn train run")
    t.add_argument("run_dir")
    t.add_argument("--min-accuracy", type=float, help="fail below this final test accuracy")
    args = p.parse_args(argv)
    if args.command == "preflight":
        return 0 if preflight() else 1
    if args.command == "versions":
        versions()
        return 0
    if args.command == "compile":
        result = compile_all(args.jobs, args.files, False if args.nvrtc else None)
        return result if result is UNAVAILABLE else (0 if result else 1)
    if args.command == "sanitizer-log":
        line = sanitizer_unavailable(pathlib.Path(args.log).read_text(errors="replace"))
        if line:
            print(f"sanitizer unavailable on this machine ({line})")
        return UNAVAILABLE if line else 0
    if args.command == "cuda-skips":
        if not pathlib.Path(args.junit_xml).is_file():
            print(f"{args.junit_xml}: no report (pytest did not finish): FAIL")
            return 1
        skipped = cuda_skips(args.junit_xml)
        for line in skipped[:10]:
            print(line if len(line) <= 160 else line[:157] + "...")
        if len(skipped) > 10:
            print(f"... and {len(skipped) - 10} more")
        print(f"{len(skipped)} cuda test(s) skipped" + (": FAIL" if skipped else ""))
        return 1 if skipped else 0
    if args.command == "data-parallel":
        result = data_parallel(args.batch, args.steps)
        return result if result is UNAVAILABLE else (0 if result else 1)
    if args.command == "train-report":
        return 0 if train_report(args.run_dir, args.min_accuracy) else 1
    return 0 if determinism(args.device, args.batch, args.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
