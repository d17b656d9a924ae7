"""Every kernel file compiles with NVRTC (the compiler CuPy uses) for every
instantiation the loader asks for. NVRTC runs without a GPU or a driver."""
import pytest

from gpucnn import cuda, nvrtc

pytestmark = pytest.mark.skipif(nvrtc.library() is None,
                                reason="NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12;"
                                       " CI installs it)")


@pytest.mark.parametrize("arch", ["compute_90", "compute_80"])
@pytest.mark.parametrize("filename", sorted(cuda.KERNELS))
def test_compiles_every_instantiation(filename, arch):
    names = cuda.name_expressions(filename)
    ok, log, lowered = nvrtc.compile(cuda.source(filename), names, arch=arch,
                                     options=cuda.NVRTC_OPTIONS, filename=filename)
    assert ok, f"{filename} failed to compile:\n{log}"
    assert "warning" not in log.lower(), log
    assert sorted(lowered) == sorted(names)
    assert all(symbol.startswith("_Z") for symbol in lowered.values())


def test_a_broken_source_fails_with_its_log():
    ok, log, lowered = nvrtc.compile("template <typename T> __global__ void k(T* a) { a[0] = b; }",
                                     ["k<float>"])
    assert not ok and "identifier \"b\" is undefined" in log and not lowered
