"""Every kernel file compiles with NVRTC (the compiler CuPy uses) for every
instantiation and tile configuration the loader asks for, and alone with its
default configuration. NVRTC runs without a GPU or a driver."""
import pytest

from gpucnn.backends import cuda
from gpucnn.tools import nvrtc

pytestmark = pytest.mark.skipif(nvrtc.library() is None,
                                reason="NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12;"
                                       " CI installs it)")


UNITS = cuda.compile_units()


@pytest.mark.parametrize("arch", ["compute_90", "compute_80"])
@pytest.mark.parametrize("unit", UNITS, ids=[f"{u.filename}-{u.config}" for u in UNITS])
def test_compiles_every_instantiation_and_configuration(unit, arch):
    names = unit.name_expressions
    ok, log, lowered = nvrtc.compile(cuda.source(unit.filename), names, arch=arch,
                                     options=unit.options, filename=unit.filename)
    assert ok, f"{unit.filename} ({unit.config}) failed to compile:\n{log}"
    assert "warning" not in log.lower(), log
    assert sorted(lowered) == sorted(names)
    assert all(symbol.startswith("_Z") for symbol in lowered.values())


@pytest.mark.parametrize("filename", sorted(cuda.KERNELS))
def test_compiles_alone_with_its_defaults(filename):
    ok, log, _ = nvrtc.compile(cuda.source(filename), cuda.name_expressions(filename),
                               options=cuda.NVRTC_OPTIONS, filename=filename)
    assert ok, log


def test_compile_units_name_every_file_and_kernel():
    assert {u.filename for u in UNITS} == set(cuda.KERNELS)
    for u in UNITS:
        assert set(u.threads) == set(cuda.KERNELS[u.filename])
        assert all(0 < t <= 1024 for t in u.threads.values())
        assert u.options[:len(cuda.NVRTC_OPTIONS)] == cuda.NVRTC_OPTIONS


def test_a_broken_source_fails_with_its_log():
    ok, log, lowered = nvrtc.compile("template <typename T> __global__ void k(T* a) { a[0] = b; }",
                                     ["k<float>"])
    assert not ok and "identifier \"b\" is undefined" in log and not lowered
