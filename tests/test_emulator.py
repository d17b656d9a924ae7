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

// cp.async through the emulator's wrappers: thread t copies in[t] into smem[t] in
// two groups (even, then odd t), waits for `wait_all` or for all but the newest
// group, then every thread reads its neighbour's element after a barrier.
__global__ void async_copy(const float* in, float* out, int mode) {
    extern __shared__ unsigned char smem[];
    float* s = reinterpret_cast<float*>(smem);
    const int t = threadIdx.x;
    if (t % 2 == 0) cp_async(s + t, in + t, true);
    cp_async_commit();
    if (t % 2 == 1) cp_async(s + t, in + t, t != 3);  // t = 3: zero-filled
    cp_async_commit();
    if (mode == 2) cp_async_wait<0>();
    if (mode == 1) cp_async_wait<1>();
    __syncthreads();
    out[t] = s[t ^ 1];
}
"""
NAMES = ["reverse_in_block<float>", "reverse_in_block<double>", "where_am_i", "async_copy"]


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


def _async_copy(module, mode):
    x = numpy.arange(1, 9, dtype=numpy.float32)
    out = numpy.zeros(8, numpy.float32)
    module.get_function("async_copy")((1,), (8,), (x, out, numpy.int32(mode)), shared_mem=32)
    return x, out


def test_cp_async_lands_at_the_wait(module):
    x, out = _async_copy(module, mode=2)
    expected = x[numpy.arange(8) ^ 1]
    expected[2] = 0  # thread 2 reads element 3, copied with src-size 0: zero-filled
    numpy.testing.assert_array_equal(out, expected)


def test_a_missing_cp_async_wait_reads_poison(module):
    _, out = _async_copy(module, mode=0)
    assert numpy.isnan(out).all()  # nothing waited for: nothing landed
    x, out = _async_copy(module, mode=1)  # all but the newest group (the odd t) landed
    odd_read = numpy.arange(8) % 2 == 1    # odd threads read even elements: landed
    numpy.testing.assert_array_equal(out[odd_read], x[numpy.arange(8) ^ 1][odd_read])
    assert numpy.isnan(out[~odd_read]).all()


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
