import os
import signal

import numpy
import pytest

import gpucnn
from gpucnn import backend

# cuBLAS gives the same bits on every stream only with a fixed workspace: the CUDA graph
# replays on a side stream, and tests/gpu/test_graph.py holds it to the eager step's bits.
# Read when cuBLAS starts, so set before any test can touch a GPU (.ci/gpu-check sets it too).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# GPUCNN_TEST_STANDIN=1 runs the whole suite with the CuPy stand-in installed as if a
# GPU were present (docs/gpu/README.md): the automatic device is then 'cuda', as on
# the lent GPU, so a test that takes the automatic device for the CPU shows here.
# Installed now, before the modules below read cuda_available() into their marks.
SESSION_STANDIN = None  # the stand-in installed for the whole session, if it is
if os.environ.get("GPUCNN_TEST_STANDIN", "") not in ("", "0"):
    import standin as SESSION_STANDIN
    backend.set_cupy_module(SESSION_STANDIN)

CUDA_SKIP = pytest.mark.skipif(
    not backend.cuda_available(),
    reason=f"no CUDA device here: {backend.cuda_unavailable_reason()}")
# For what only CuPy on a GPU does (a captured graph that replays): the session's
# stand-in plays 'cuda' for CUDA_SKIP's tests, not for these.
REAL_CUDA_SKIP = pytest.mark.skipif(
    SESSION_STANDIN is not None or not backend.cuda_available(),
    reason="no CUDA device here: " + ("the CuPy stand-in plays it (GPUCNN_TEST_STANDIN)"
                                      if SESSION_STANDIN is not None
                                      else str(backend.cuda_unavailable_reason())))
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]

# Tolerances against float64 references (PyTorch or NumPy), per dtype.
# float64: ops agree to rounding (sums of up to ~1e3 terms): 1e-10 relative.
# float32: sums of up to ~1e3 products of O(1) values in a different order.
TOL = {numpy.float64: dict(rtol=1e-10, atol=1e-10), numpy.float32: dict(rtol=2e-4, atol=2e-5)}


@pytest.fixture(autouse=True)
def fp32_convolutions():
    """Every test runs float32 GPU convolutions in FP32 (the SIMT kernels), which TOL
    was stated for, unless it asks for another precision itself (gpucnn.conv_precision,
    or a launcher's precision argument): a GPU's default is TF32, whose rounding
    tests/kernels/test_precision.py states and tests apart."""
    with gpucnn.conv_precision("fp32"):
        yield


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed; these tests compare "
                                               "with it (CI installs torch==2.13.0)")


@pytest.fixture
def ctrl_c():
    """SIGINT handled as in an interactive terminal (KeyboardInterrupt) for the test's
    length: a job started in the background (cmd &, as CI may be) inherits SIGINT
    ignored, and training keeps an ignored SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def cpu_threads():
    """set_num_threads(n) for the test's length; gpucnn's own count comes back after."""
    import gpucnn
    before = gpucnn.get_num_threads()
    try:
        yield gpucnn.set_num_threads
    finally:
        gpucnn.set_num_threads(before)


@pytest.fixture
def rng():
    return numpy.random.default_rng(1234)


def close(actual, expected, dtype, scale=1.0):
    """assert_allclose with the dtype's tolerance, atol scaled by the data's size."""
    tol = TOL[numpy.dtype(dtype).type]
    numpy.testing.assert_allclose(backend.to_numpy(actual), backend.to_numpy(expected),
                                  rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.fixture
def standin():
    """The CuPy stand-in (tests/standin) playing CuPy: device 'cuda' is then the GPU
    path as CuPy runs it, its kernels served by the emulator. Named through the
    backend's one seam, set_cupy_module; restored afterwards."""
    import standin as module
    previous = backend.set_cupy_module(module)
    try:
        # the device check (one tiny kernel, one sync) runs once, here, not inside a test
        assert backend.cuda_available(), backend.cuda_unavailable_reason()
        yield module
    finally:
        backend.set_cupy_module(previous)


def idx_set(root, n_train=40, n_test=20):
    """root holding the four IDX files of a random 28x28 MNIST-like set (a test's data)."""
    from gpucnn.app import data
    rng = numpy.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
                      "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
                      "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
                      "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}.items():
        data.write_idx(root / name, arr)
    return root
