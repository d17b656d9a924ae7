import numpy
import pytest

from gpucnn import backend


def test_numpy_arrays_give_numpy():
    assert backend.get_array_module(numpy.zeros(2), None, numpy.ones(1)) is numpy
    assert backend.get_array_module() is numpy


def test_resolve_device(monkeypatch):
    assert backend.resolve_device("cpu")[0] == "cpu"
    assert backend.resolve_device("CPU")[0] == "cpu"
    monkeypatch.setenv("GPUCNN_DEVICE", "cpu")
    device, why = backend.resolve_device()
    assert device == "cpu" and "GPUCNN_DEVICE" in why
    monkeypatch.setenv("GPUCNN_DEVICE", "tpu")
    with pytest.raises(ValueError, match=r"got 'tpu' \(from GPUCNN_DEVICE\)"):
        backend.resolve_device()


@pytest.mark.skipif(backend.cuda_available(), reason="checks the no-GPU messages")
def test_cuda_missing_is_a_clear_error():
    reason = backend.cuda_unavailable_reason()
    assert "CuPy is not installed" in reason or "no CUDA device" in reason
    with pytest.raises(RuntimeError, match="device 'cuda' requested"):
        backend.resolve_device("cuda")
    device, why = backend.resolve_device("auto")
    assert device == "cpu" and why in ("CuPy not installed", "no usable CUDA device",
                                       "no CUDA device")


def test_to_device_cpu_round_trip():
    a = numpy.arange(3.0)
    assert backend.to_numpy(a) is a
    assert backend.to_device(None, "cpu") is None
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        backend.xp_for("gpu")


@pytest.mark.parametrize("name", ["gpu", "CPU", "auto"])
def test_to_device_takes_only_a_resolved_device_name(name):
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda', got"):
        backend.to_device(numpy.zeros(2), name)
