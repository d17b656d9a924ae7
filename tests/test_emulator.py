"""The CPU emulation harness itself: barriers, shared memory, indices, arguments."""
import numpy
import pytest

from emulator import EmulatedModule, asan_enabled

CODE = r"""
template <typename T>
__global__ void reverse_in_block(const T* in, T* out, int n, bool sync) {
    extern __shared__ unsigned char smem[];
    T* s = reinterpret_cast<T*>(smem);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = i < n ? in[i] : T(0);
    if (sync) __syncthreads();
    const T mirrored = s[blockDim.x - 1 - threadIdx.x];  // written by another thread
    if (i < n) out[i] = mirrored;
}

__global__ void where_am_i(int* out) {
    const int b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    out[b * blockDim.x * blockDim.y * blockDim.z + t] = 1000 * b + t;
}
"""
NAMES = ["reverse_in_block<float>", "reverse_in_block<double>", "where_am_i"]


@pytest.fixture(scope="module")
def module():
    return EmulatedModule(CODE, NAMES)


@pytest.mark.parametrize("dtype, ctype", [(numpy.float32, "float"), (numpy.float64, "double")])
def test_barrier_makes_shared_memory_visible(module, dtype, ctype):
    n = 100  # ragged: the last block is not full
    x = numpy.arange(n, dtype=dtype)
    out = numpy.full(n, -1, dtype=dtype)
    f = module.get_function(f"reverse_in_block<{ctype}>")
    f((4,), (32,), (x, out, numpy.int32(n), numpy.bool_(True)), shared_mem=32 * x.itemsize)
    for b in range(3):  # full blocks reverse exactly
        numpy.testing.assert_array_equal(out[32 * b:32 * b + 32], x[32 * b:32 * b + 32][::-1])
    # the ragged last block: its 4 live outputs read threads 31..28, which loaded zeros
    numpy.testing.assert_array_equal(out[96:], 0)


def test_missing_barrier_reads_garbage(module):
    n = 64
    x = numpy.arange(n, dtype=numpy.float32)
    out = numpy.zeros(n, dtype=numpy.float32)
    f = module.get_function("reverse_in_block<float>")
    f((2,), (32,), (x, out, numpy.int32(n), numpy.bool_(False)), shared_mem=32 * 4)
    assert numpy.isnan(out).any()  # read before the other threads wrote: the 0xFF fill


def test_block_and_thread_indices_in_3d(module):
    grid, block = (2, 3, 2), (4, 2, 3)
    out = numpy.full(12 * 24, -1, dtype=numpy.int32)
    module.get_function("where_am_i")(grid, block, (out,))
    b, t = numpy.divmod(numpy.arange(out.size), 24)
    numpy.testing.assert_array_equal(out, 1000 * b + t)


def test_arguments_must_be_typed(module):
    f = module.get_function("where_am_i")
    with pytest.raises(TypeError, match="typed NumPy scalar"):
        f((1,), (1,), (5,))
    with pytest.raises(ValueError, match="not C-contiguous"):
        f((1,), (1,), (numpy.zeros((4, 4), numpy.int32)[:, ::2],))
    with pytest.raises(KeyError, match="name_expressions"):
        module.get_function("reverse_in_block<int>")


OOB = """
import sys
sys.path.insert(0, {tests!r})
import numpy
from emulator import EmulatedModule, asan_enabled
m = EmulatedModule("__global__ void k(float* a, int n) {{ a[threadIdx.x + n] = 1.0f; }}", ["k"])
a = numpy.zeros(8, numpy.float32)
m.get_function("k")((1,), (4,), (a, numpy.int32(6)))
"""


@pytest.mark.skipif(not asan_enabled(), reason="only in the AddressSanitizer run "
                                               "(GPUCNN_EMU_ASAN=1, as .ci/run does)")
def test_address_sanitizer_catches_an_out_of_bounds_write():
    import pathlib
    import subprocess
    import sys
    code = OOB.format(tests=str(pathlib.Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "heap-buffer-overflow" in done.stderr
