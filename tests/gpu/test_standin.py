"""The CuPy stand-in refuses what CuPy refuses, counts syncs, and the backend
recognises its arrays through its one seam (set_cupy_module) or, named
``cupy``, with no initialisation at all."""
import os
import pathlib
import re
import subprocess
import sys

import numpy
import pytest

from gpucnn import backend, functional as F
from gpucnn.backends import cuda

TESTS = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("convert", [numpy.asarray, numpy.ascontiguousarray, numpy.array,
                                     numpy.exp, lambda a: numpy.add(a, 1),
                                     lambda a: numpy.zeros(3) + a, lambda a: a + numpy.zeros(3)])
def test_standin_refuses_implicit_conversion_to_numpy(standin, convert):
    with pytest.raises(TypeError):
        convert(standin.arange(3.0))


def test_standin_counts_every_device_to_host_sync(standin):
    a = standin.arange(6.0).reshape(2, 3)
    with standin.count_syncs() as n:
        total = a.sum()
        b = (a * 2 + 1).max(axis=0)
        assert isinstance(total, standin.ndarray) and total.shape == ()  # a device scalar
        assert n() == 0
        assert float(total) == 15.0 and int(total) == 15 and bool(total)
        assert total.item() == 15.0
        assert numpy.array_equal(b.get(), [7.0, 9.0, 11.0])
        assert numpy.array_equal(standin.asnumpy(b), [7.0, 9.0, 11.0])
        assert n() == 6


def test_standin_runtime_events_and_memory_pool(standin):
    rt = standin.cuda.runtime
    assert rt.getDeviceCount() == 1 and rt.getDevice() == 0
    assert rt.getDeviceProperties(0)["major"] >= 8
    start, end = standin.cuda.Event(), standin.cuda.Event()
    start.record()
    end.record()
    end.synchronize()
    assert standin.cuda.get_elapsed_time(start, end) >= 0
    pool = standin.get_default_memory_pool()
    before = pool.used_bytes()
    a = standin.zeros(1 << 20, dtype=numpy.uint8)
    assert pool.used_bytes() - before == 1 << 20 and pool.total_bytes() >= pool.used_bytes()
    del a
    assert pool.used_bytes() == before
    r = standin.random.default_rng(3).random((2, 2), dtype=numpy.float32)
    assert isinstance(r, standin.ndarray) and r.dtype == numpy.float32
    # CuPy's generator is not NumPy's: a library that draws with it on the GPU draws other
    # numbers than on the CPU, and the stand-in must show that as a GPU would
    assert not numpy.array_equal(r.get(), numpy.random.default_rng(3).random((2, 2),
                                                                           dtype=numpy.float32))


def test_standin_rawmodule_runs_the_emulated_kernels(standin):
    kernels = cuda.kernels_for(standin)
    assert kernels is not None and kernels is cuda.kernels_for(standin)
    x = standin.asarray(numpy.random.default_rng(0).standard_normal((2, 3, 6, 6)))
    before = standin.launches()
    y, idx = F.max_pool2d(x, 2)
    assert standin.launches() == before + 1
    assert isinstance(y, standin.ndarray)
    expected = x.get().reshape(2, 3, 3, 2, 3, 2).max(axis=(3, 5))
    assert numpy.array_equal(y.get(), expected)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        kernels._function("max_pool2d.cu", "max_pool2d_forward", numpy.float64)(
            (1,), (32,), (numpy.zeros(4), y, idx))


def test_standin_backend_seam(standin):
    a = standin.zeros((2, 2))
    assert backend.is_cupy_array(a) and backend.device_of(a) == "cuda"
    assert backend.get_array_module(a) is standin
    assert backend.xp_for("cuda") is standin
    assert backend.resolve_device("auto")[0] == "cuda"
    assert backend.cuda_unavailable_reason() is None
    with pytest.raises(ValueError, match="different devices"):
        backend.get_array_module(a, numpy.zeros(2))
    host = backend.to_numpy(a)
    assert type(host) is numpy.ndarray
    assert backend.device_of(backend.to_device(host, "cuda")) == "cuda"


def test_without_the_seam_standin_arrays_are_not_device_arrays():
    import standin
    from conftest import SESSION_STANDIN
    previous = backend.set_cupy_module(None)
    try:
        assert previous is SESSION_STANDIN  # no test left its own stand-in installed
        assert not backend.is_cupy_array(standin.zeros(2))
    finally:
        backend.set_cupy_module(previous)


def test_cupy_arrays_are_recognised_before_any_initialisation(tmp_path):
    """A user's first call may be F.conv2d(cupy_array, ...): the backend must see a
    device array without cuda_available() or resolve_device() having run. The
    stand-in is imported as ``cupy`` in a fresh interpreter (no seam used)."""
    script = (
        "import sys, numpy; import standin; sys.modules['cupy'] = standin\n"
        "import cupy\n"
        "from gpucnn import functional as F\n"
        "x = cupy.asarray(numpy.ones((1, 2, 5, 5), numpy.float32))\n"
        "w = cupy.asarray(numpy.ones((3, 2, 3, 3), numpy.float32))\n"
        "y = F.conv2d(x, w, padding=1)\n"
        "dx, dw, db = F.conv2d_backward(y, x, w, padding=1)\n"
        "assert isinstance(dx, cupy.ndarray) and cupy.launches() >= 3, cupy.launches()\n"
        "print(float(y[0, 0, 2, 2]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "18.0"


def _broken(standin, **parts):
    """A copy of the stand-in module with some parts failing as CuPy's do."""
    import types
    module = types.ModuleType("broken_standin")
    module.__dict__.update({k: v for k, v in vars(standin).items() if not k.startswith("__")})
    module.__dict__.update(parts)
    return module


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("parts, short, detail", [
    (lambda s: dict(cuda=type(s.cuda)(**{**vars(s.cuda), "runtime": type(s.cuda.runtime)(
        **{**vars(s.cuda.runtime), "getDeviceCount": _raise(s.CUDARuntimeError(
            "cudaErrorInsufficientDriver: CUDA driver version is insufficient"))})})),
     "no usable NVIDIA driver", "no usable NVIDIA driver (cudaErrorInsufficientDriver"),
    (lambda s: dict(cuda=type(s.cuda)(**{**vars(s.cuda), "runtime": type(s.cuda.runtime)(
        **{**vars(s.cuda.runtime), "getDeviceCount": _raise(s.CUDARuntimeError(
            "cudaErrorNoDevice: no CUDA-capable device is detected"))})})),
     "no CUDA device", "no CUDA device is visible"),
    (lambda s: dict(RawModule=_raise(RuntimeError(
        'nvrtc: error: catastrophic error: cannot open source file "cuda_fp16.h"'))),
     "CUDA headers missing", "the CUDA headers are missing, so a RawModule kernel (NVRTC) do"),
    (lambda s: dict(RawModule=_raise(RuntimeError(
        "NVRTC_ERROR_COMPILATION: error: identifier \"T\" is undefined"))),
     "NVRTC error", "NVRTC could not compile a RawModule kernel"),
], ids=["no driver", "no device", "no headers", "nvrtc error"])
def test_standin_auto_and_info_say_what_is_missing(standin, parts, short, detail, capsys):
    from gpucnn.app.cli import main
    broken = _broken(standin, **parts(standin))
    previous = backend.set_cupy_module(broken)
    try:
        assert backend.resolve_device("auto") == ("cpu", short)
        assert detail in backend.cuda_unavailable_reason()
        with pytest.raises(RuntimeError, match=re.escape(detail)):
            backend.resolve_device("cuda")
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert f"device: cpu ({short})" in out and f"cuda: not usable: {detail}" in out
    finally:
        backend.set_cupy_module(previous)
