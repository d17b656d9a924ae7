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
def test_a_configuration_comes_from_the_launcher_only(filename):
    """A file with -D options takes them from its launcher alone: compiled without
    them it fails, naming where they come from (no default repeats a Python constant);
    a file without any compiles alone."""
    ok, log, _ = nvrtc.compile(cuda.source(filename), cuda.name_expressions(filename),
                               options=cuda.NVRTC_OPTIONS, filename=filename)
    configured = any(len(u.options) > len(cuda.NVRTC_OPTIONS)
                     for u in cuda.compile_units() if u.filename == filename)
    assert ok == (not configured), log
    if configured:
        assert f"kernels/{filename} takes" in log and "gpucnn/backends/cuda/conv.py" in log


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


def _ptx(code, options):
    """NVRTC's PTX for code (compute_90), straight from the library."""
    import ctypes
    lib = nvrtc.library()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"k.cu", 0, None, None) == 0
    try:
        opts = [b"--gpu-architecture=compute_90", *(o.encode() for o in options)]
        assert lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)) == 0
        size = ctypes.c_size_t()
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        return buf.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


FTZ_PROBE = 'extern "C" __global__ void k(float* a, double* d) { a[0] = a[1] * a[2] + a[3]; ' \
            'd[0] = d[1] * d[2] + d[3]; }'


@pytest.mark.parametrize("options, flushes", [
    ((), False),                                  # NVRTC's default
    (("-ftz=true",), True),
    (("-ftz=false", "-ftz=true"), True),          # the last one decides: CuPy appends -ftz=true,
    (("-ftz=true", "--ftz=false"), False),        # so a caller's -ftz=false cannot undo it
    (cuda.NVRTC_OPTIONS, True),                   # what the loader states, as CuPy compiles
])
def test_the_emulator_reads_the_ftz_options_as_nvrtc_does(options, flushes):
    import emulator
    ptx = _ptx(FTZ_PROBE, options)
    assert ("fma.rn.ftz.f32" in ptx) == flushes and ("fma.rn.f32" in ptx) != flushes
    assert "fma.rn.f64" in ptx and ".ftz.f64" not in ptx  # double never flushes
    assert emulator.flushes_denormals(options) == flushes
    assert emulator.flushes_denormals(options + emulator.CUPY_APPENDED_OPTIONS)
