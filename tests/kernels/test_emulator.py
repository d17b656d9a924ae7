"""The CPU emulation harness itself: barriers, shared memory, indices, arguments,
float32 denormals, and proof that each of its checks catches a bug planted for
it: a race that index order hides, an output element no thread writes, every
launch limit, an argument of another type than its parameter, threads at
different barriers or exited while others wait at one."""
import numpy
import pytest

import emulator
from emulator import EmulatedModule, LaunchError, asan_enabled

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


# ---- thread and block orders -------------------------------------------------------
RACES = r"""
// out[i] = in[i - 1] within a block, through shared memory; without the barrier
// a thread may read its neighbour's slot before the neighbour wrote it.
__global__ void shift_in_block(const float* in, float* out, bool sync) {
    extern __shared__ unsigned char smem[];
    float* s = reinterpret_cast<float*>(smem);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    s[threadIdx.x] = in[i];
    if (sync) __syncthreads();
    out[i] = threadIdx.x > 0 ? s[threadIdx.x - 1] : 0.0f;
}

// A running sum across blocks: correct only if block b-1 runs before block b,
// which CUDA never promises.
__global__ void chain_across_blocks(float* data) {
    if (threadIdx.x == 0 && blockIdx.x > 0) data[blockIdx.x] += data[blockIdx.x - 1];
}

// Static shared memory: one array per block; reversed through it.
template <typename T>
__global__ void reverse_static(const T* in, T* out, bool sync) {
    __shared__ T tile[64];  // one variable per declaration, as the loader needs
    const int i = blockIdx.x * 64 + threadIdx.x;
    tile[threadIdx.x] = in[i];
    if (sync) __syncthreads();
    out[i] = tile[63 - threadIdx.x];
}

__global__ void static_and_dynamic(float* out) {
    __shared__ float big[8192];  // 32 KiB
    extern __shared__ unsigned char smem[];
    big[threadIdx.x] = 1.0f;
    smem[threadIdx.x] = 1;
    out[threadIdx.x] = big[threadIdx.x] + smem[threadIdx.x];
}

// Every thread adds into one shared total in the same barrier interval: on a GPU
// a lost-update race; here each addition is whole, but their order follows the
// schedule, and float addition does not commute in its rounding.
__global__ void racy_sum(const float* x, float* out) {
    extern __shared__ unsigned char smem[];
    float* total = reinterpret_cast<float*>(smem);
    if (threadIdx.x == 0) *total = 0.0f;
    __syncthreads();
    *total += x[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) out[0] = *total;
}

__global__ void touch(int* out) {
    if (blockIdx.x + blockIdx.y + blockIdx.z + threadIdx.x + threadIdx.y + threadIdx.z == 0)
        out[0] += 1;
}

__global__ void all_but_last(float* out, long long* idx, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n - 1) {  // the planted bug: the last element is never written
        out[i] = 1.0f;
        idx[i] = i;
    }
}
"""
RACE_NAMES = ["shift_in_block", "chain_across_blocks", "reverse_static<float>",
              "reverse_static<double>", "static_and_dynamic", "racy_sum", "touch",
              "all_but_last"]


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda o: f"order{o}")
def races(request):
    return EmulatedModule(RACES, RACE_NAMES, order=request.param)


def test_a_race_that_index_order_hides_shows_under_the_other_orders(races):
    x = numpy.arange(1, 129, dtype=numpy.float32)
    expected = numpy.concatenate([[0], x[:63], [0], x[64:127]]).astype(numpy.float32)
    f = races.get_function("shift_in_block")
    out = numpy.zeros_like(x)
    f((2,), (64,), (x, out, numpy.bool_(True)), shared_mem=64 * 4)
    numpy.testing.assert_array_equal(out, expected)  # with the barrier: every order agrees
    out = numpy.zeros_like(x)
    f((2,), (64,), (x, out, numpy.bool_(False)), shared_mem=64 * 4)
    if races.order == 0:  # thread t-1 happens to run first: the race goes unseen
        numpy.testing.assert_array_equal(out, expected)
    else:  # slots read before their thread wrote them: the 0xFF fill, a NaN
        assert numpy.isnan(out).sum() >= 8


def test_blocks_run_in_the_order_too(races):
    data = numpy.ones(64, dtype=numpy.float32)
    races.get_function("chain_across_blocks")((64,), (32,), (data,))
    chained = numpy.array_equal(data, numpy.arange(1, 65, dtype=numpy.float32))
    assert chained == (races.order == 0)  # only index order makes the planted bug look right


def test_a_result_that_follows_the_schedule_fails_the_bitwise_comparison():
    x = (numpy.random.default_rng(0).standard_normal(256) * 10.0 ** (numpy.arange(256) % 5)
         ).astype(numpy.float32)  # magnitudes 1..1e4: the rounding depends on the order
    out = numpy.zeros(1, numpy.float32)
    alone = EmulatedModule(RACES, RACE_NAMES, order=1).get_function("racy_sum")
    alone((1,), (256,), (x, out), shared_mem=4)
    assert out[0] == numpy.cumsum(x[::-1])[-1]  # one order alone: a plausible total
    checked = EmulatedModule(RACES, RACE_NAMES, order=1, compare_order=0)
    with pytest.raises(emulator.OrderError, match="argument 1 differs between thread orders"):
        checked.get_function("racy_sum")((1,), (256,), (x, out), shared_mem=4)
    data = numpy.ones(64, dtype=numpy.float32)
    with pytest.raises(emulator.OrderError, match="62 of 64 elements"):
        checked.get_function("chain_across_blocks")((64,), (32,), (data,))
    x = numpy.arange(128, dtype=numpy.float32)  # a kernel without a race passes, in place too
    out = numpy.zeros_like(x)
    checked.get_function("shift_in_block")((2,), (64,), (x, out, numpy.bool_(True)),
                                           shared_mem=256)
    assert out[1] == 0 and out[2] == 1


@pytest.mark.parametrize("ctype, dtype", [("float", numpy.float32), ("double", numpy.float64)])
def test_static_shared_arrays_are_per_block_and_filled(races, ctype, dtype):
    x = numpy.arange(192, dtype=dtype)
    f = races.get_function(f"reverse_static<{ctype}>")
    out = numpy.zeros_like(x)
    f((3,), (64,), (x, out, numpy.bool_(True)))  # shared by the threads of a block
    numpy.testing.assert_array_equal(out, x.reshape(3, 64)[:, ::-1].ravel())
    out = numpy.zeros_like(x)
    f((3,), (64,), (x, out, numpy.bool_(False)))
    # Without the barrier some thread reads a slot not yet written in its own
    # block: NaN, even though the block before left that slot written.
    assert numpy.isnan(out.reshape(3, 64)).any(axis=1).all()


def test_an_output_element_no_thread_writes_is_poisoned(races):
    n = 100
    out = emulator.poisoned.numpy.empty(n, dtype=numpy.float32)
    idx = emulator.poisoned.numpy.empty(n, dtype=numpy.int64)
    races.get_function("all_but_last")((4,), (32,), (out, idx, numpy.int32(n)))
    numpy.testing.assert_array_equal(numpy.isnan(out), numpy.arange(n) == n - 1)
    assert idx[-1] == numpy.iinfo(numpy.int64).min
    numpy.testing.assert_array_equal(idx[:-1], numpy.arange(n - 1))


def test_the_launchers_allocate_poisoned_outputs():
    xp = emulator.kernels().xp
    assert numpy.isnan(xp.empty((2, 3), dtype=numpy.float64)).all()
    assert numpy.isnan(xp.empty_like(numpy.zeros(4, numpy.float32))).all()
    assert (xp.empty(3, dtype=numpy.int64) == numpy.iinfo(numpy.int64).min).all()
    assert xp.zeros(3).sum() == 0 and xp.float32 is numpy.float32  # the rest is NumPy


# ---- launch limits ------------------------------------------------------------------
@pytest.mark.parametrize("grid, block, why", [
    ((2 ** 31, 1, 1), (1,), "grid"), ((0, 1, 1), (1,), "grid"),
    ((1, 65536, 1), (1,), "grid"), ((1, 1, 65536), (1,), "grid"),
    ((1,), (1025, 1, 1), "block"), ((1,), (1, 1025, 1), "block"), ((1,), (1, 1, 65), "block"),
    ((1,), (32, 32, 2), "2048 threads, over the limit of 1024"),
])
def test_launches_the_driver_refuses_are_refused(races, grid, block, why):
    out = numpy.zeros(1, numpy.int32)
    with pytest.raises(LaunchError, match=why):
        races.get_function("touch")(grid, block, (out,))
    assert out[0] == 0  # nothing ran


@pytest.mark.parametrize("grid, block", [((1, 65535, 1), (1,)), ((1, 1, 65535), (1,)),
                                         ((1,), (1024, 1, 1)), ((1,), (2, 8, 64))])
def test_launches_at_the_limits_run(grid, block):
    out = numpy.zeros(1, numpy.int32)
    EmulatedModule(RACES, RACE_NAMES).get_function("touch")(grid, block, (out,))
    assert out[0] == 1


def test_dynamic_shared_memory_over_48_kib_needs_the_opt_in():
    m = EmulatedModule(RACES, RACE_NAMES)
    f = m.get_function("shift_in_block")
    x = numpy.zeros(64, numpy.float32)
    args = (x, x.copy(), numpy.bool_(True))
    f((1,), (64,), args, shared_mem=48 * 1024)
    with pytest.raises(LaunchError, match="48 KiB unless the launcher opts in"):
        f((1,), (64,), args, shared_mem=48 * 1024 + 1)
    m.get_function("shift_in_block").max_dynamic_shared_size_bytes = 100 * 1024  # per kernel
    assert f.max_dynamic_shared_size_bytes == 100 * 1024
    assert m.get_function("touch").max_dynamic_shared_size_bytes == 48 * 1024
    f((1,), (64,), args, shared_mem=100 * 1024)
    with pytest.raises(LaunchError, match="over the kernel's limit of 102400"):
        f((1,), (64,), args, shared_mem=100 * 1024 + 1)
    f.max_dynamic_shared_size_bytes = 227 * 1024
    f((1,), (64,), args, shared_mem=227 * 1024)
    with pytest.raises(LaunchError, match="227 KiB"):
        f.max_dynamic_shared_size_bytes = 227 * 1024 + 1


def test_static_and_dynamic_shared_memory_add_up():
    m = EmulatedModule(RACES, RACE_NAMES)
    f = m.get_function("static_and_dynamic")
    out = numpy.zeros(32, numpy.float32)
    f((1,), (32,), (out,), shared_mem=16 * 1024)  # 32 + 16 KiB: just fits
    numpy.testing.assert_array_equal(out, 2)
    with pytest.raises(LaunchError, match=r"32768 bytes static \+ 16385 dynamic"):
        f((1,), (32,), (out,), shared_mem=16 * 1024 + 1)
    f.max_dynamic_shared_size_bytes = 64 * 1024  # opted in: up to 227 KiB in all
    f((1,), (32,), (out,), shared_mem=64 * 1024)


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
from emulator import EmulatedModule
m = EmulatedModule({code!r}, ["k"])
a = numpy.zeros(8, numpy.float32)
m.get_function("k")((1,), (4,), (a, numpy.int32(6)), shared_mem=16)
"""
GLOBAL_OOB = "__global__ void k(float* a, int n) { a[threadIdx.x + n] = 1.0f; }"
SHARED_OOB = """__global__ void k(float* a, int n) {
    extern __shared__ unsigned char smem[];
    a[threadIdx.x] = reinterpret_cast<float*>(smem)[threadIdx.x + n];  // past the 16 bytes
}"""


@pytest.mark.skipif(not asan_enabled(), reason="only in the AddressSanitizer run "
                                               "(GPUCNN_EMU_ASAN=1, as .ci/run does)")
@pytest.mark.parametrize("code, report", [(GLOBAL_OOB, "heap-buffer-overflow"),
                                          (SHARED_OOB, "use-after-poison")])
def test_address_sanitizer_catches_out_of_bounds_accesses(code, report):
    import pathlib
    import subprocess
    import sys
    script = OOB.format(tests=str(pathlib.Path(__file__).resolve().parents[1]), code=code)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode != 0 and report in done.stderr, done.stderr[-2000:]


# ---- kernel argument types -----------------------------------------------------------
TYPED = r"""
template <typename T>
__global__ void typed(const T* __restrict__ x, T* out, int n, long long offset, T scale,
                      bool flag) {
    const int i = threadIdx.x;
    if (i < n) out[i] = x[i + offset] * scale + (flag ? T(1) : T(0));
}

__global__ void untyped(void* data, unsigned int count) {
    if (threadIdx.x < count) static_cast<unsigned char*>(data)[threadIdx.x] = 7;
}
"""


@pytest.fixture(scope="module")
def typed():
    return EmulatedModule(TYPED, ["typed<float>", "typed<double>", "untyped"])


def _typed_args(dtype, **change):
    args = dict(x=numpy.arange(8, dtype=dtype), out=numpy.zeros(4, dtype), n=numpy.int32(4),
                offset=numpy.int64(2), scale=dtype(3), flag=numpy.bool_(True))
    args.update(change)
    return tuple(args.values())


def test_the_parameters_are_known_from_the_source(typed):
    assert typed.get_function("typed<double>").parameters == [
        ("const double*", "x"), ("double*", "out"), ("int", "n"), ("long long", "offset"),
        ("double", "scale"), ("bool", "flag")]
    assert typed.get_function("untyped").parameters == [("void*", "data"),
                                                        ("unsigned int", "count")]


@pytest.mark.parametrize("ctype, dtype", [("float", numpy.float32), ("double", numpy.float64)])
def test_arguments_of_the_declared_types_run(typed, ctype, dtype):
    args = _typed_args(dtype)
    typed.get_function(f"typed<{ctype}>")((1,), (8,), args)
    numpy.testing.assert_array_equal(args[1], numpy.arange(2, 6) * 3 + 1)
    data = numpy.zeros(2, numpy.float32)  # void*: any array
    typed.get_function("untyped")((1,), (16,), (data, numpy.uint32(8)))
    numpy.testing.assert_array_equal(data.view(numpy.uint8), [7] * 8)


@pytest.mark.parametrize("change, message", [
    # the planted bug: an int64 where the kernel reads an int (x86 reads its low half)
    (dict(n=numpy.int64(4)), r"typed<float>: argument 2 \(int n\): got a scalar of int64 where the "
                             r"kernel reads int32; CuPy would pass its 8 bytes"),
    (dict(offset=numpy.int32(2)),
     r"argument 3 \(long long offset\): got a scalar of int32 where the kernel reads int64"),
    (dict(scale=numpy.float64(3)),
     r"argument 4 \(float scale\): got a scalar of float64 where the kernel reads float32"),
    (dict(flag=numpy.int32(1)),
     r"argument 5 \(bool flag\): got a scalar of int32 where the kernel reads bool"),
    (dict(out=numpy.zeros(4, numpy.float64)),
     r"argument 1 \(float\* out\): got an array of float64 where the kernel reads float32"),
    (dict(x=numpy.float32(0)), r"argument 0 \(const float\* x\): got a scalar of float32 for a "
                               r"pointer"),
    (dict(n=numpy.zeros(1, numpy.int32)), r"argument 2 \(int n\): got an array of int32 for a "
                                          r"scalar"),
])
def test_an_argument_of_another_type_is_refused(typed, change, message):
    args = _typed_args(numpy.float32, **change)
    with pytest.raises(emulator.ArgumentError, match=message):
        typed.get_function("typed<float>")((1,), (8,), args)


def test_a_missing_argument_is_refused(typed):
    with pytest.raises(emulator.ArgumentError, match=r"typed<float> takes 6 arguments \(const "
                                                     r"float\* x, .*bool flag\), got 5"):
        typed.get_function("typed<float>")((1,), (8,), _typed_args(numpy.float32)[:5])


def test_parameter_names_are_read_past_comments_templates_and_attributes():
    code = """
    template <int N> struct Tile {};
    __device__ void helper(int a);  // not a kernel: conv2d(int nope)
    template <typename T, int K>
    __global__ void __launch_bounds__(256, 2)
    conv2d(const T* __restrict__ x /* input, (N, C) */, Tile<(K > 1 ? 2 : 3)> tile,
           unsigned long long count) {}
    """
    assert emulator.parameter_names(code, "conv2d<float, 3>") == ["x", "tile", "count"]
    assert emulator.parameter_names(code, "helper") is None


# ---- barriers ------------------------------------------------------------------------
BARRIERS = r"""
__global__ void barriers(float* out, int mode) {
    const int t = threadIdx.x;
    if (mode == 0 && blockIdx.x == 0) __syncthreads();  // uniform across each block: fine
    if (mode == 1) {
        if (t < 16) __syncthreads();  // BARRIER A
        else __syncthreads();  // BARRIER B
    }
    if (mode == 2) {
        if (t == 5) return;  // EXIT
        __syncthreads();  // BARRIER C
    }
    if (mode == 3 && t % 2 == 0) __syncthreads();  // BARRIER D: the odd threads run on and exit
    out[blockIdx.x * blockDim.x + t] = 1.0f;
}
"""


def _line(code, marker):
    return next(i for i, text in enumerate(code.split("\n"), 1) if marker in text)


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda o: f"order{o}")
def barriers(request):
    return EmulatedModule(BARRIERS, ["barriers"], order=request.param).get_function("barriers")


def test_a_barrier_every_thread_of_the_block_reaches_runs(barriers):
    out = numpy.zeros(64, numpy.float32)
    barriers((2,), (32,), (out, numpy.int32(0)))
    assert (out == 1).all()


def test_threads_at_different_barriers_are_refused(barriers):
    out = numpy.zeros(64, numpy.float32)
    a, b = _line(BARRIERS, "BARRIER A"), _line(BARRIERS, "BARRIER B")
    with pytest.raises(LaunchError, match=rf"barriers: divergent __syncthreads in block \(\d+, 0, "
                                          rf"0\): thread \(0, 0, 0\) waits at kernel.cu:{a}, "
                                          rf"thread \(16, 0, 0\) at kernel.cu:{b}"):
        barriers((2,), (32,), (out, numpy.int32(1)))


@pytest.mark.parametrize("mode, barrier, exited", [(2, "BARRIER C", 5), (3, "BARRIER D", 1)])
def test_a_thread_that_exits_while_others_wait_is_refused(barriers, mode, barrier, exited):
    out = numpy.zeros(64, numpy.float32)
    with pytest.raises(LaunchError, match=rf"barriers: thread \({exited}, 0, 0\) of block \(\d+, "
                                          rf"0, 0\) exited while thread \(0, 0, 0\) waits at the "
                                          rf"__syncthreads at kernel.cu:"
                                          rf"{_line(BARRIERS, barrier)}"):
        barriers((2,), (32,), (out, numpy.int32(mode)))
    barriers((2,), (32,), (out, numpy.int32(0)))  # the next launch runs as usual
    assert (out == 1).all()


# ---- vector stores: a misaligned one faults on a GPU ------------------------------------
VECTOR_STORE = r"""
__global__ void store_at(float* out, int offset) {
    if (emu::check_aligned(out + offset, 16, "a float4 store"))
        *reinterpret_cast<float4*>(out + offset) = float4{1.0f, 2.0f, 3.0f, 4.0f};
}
"""


def test_a_misaligned_vector_store_fails_the_launch():
    store = EmulatedModule(VECTOR_STORE, ["store_at"]).get_function("store_at")
    out = numpy.zeros(12, numpy.float32)  # NumPy's data is 16-byte aligned, as CuPy's is
    store((1,), (1,), (out, numpy.int32(4)))
    assert out[4:8].tolist() == [1, 2, 3, 4]
    with pytest.raises(LaunchError, match="misaligned address: a float4 store of 16 bytes at an "
                                          "address 8 bytes past a multiple of 16"):
        store((1,), (1,), (out, numpy.int32(2)))
    assert out[:4].tolist() == [0, 0, 0, 0] and out[8:].tolist() == [0] * 4  # not stored


# ---- float32 denormals: CuPy compiles with -ftz=true ---------------------------------
DENORMALS = r"""
template <typename T>
__global__ void multiply(const T* a, const T* b, T* out) {
    out[threadIdx.x] = a[threadIdx.x] * b[threadIdx.x];
}

__global__ void less(const float* x, int* out) {
    out[threadIdx.x] = x[2 * threadIdx.x] < x[2 * threadIdx.x + 1];
}
"""
DENORMAL_NAMES = ["multiply<float>", "multiply<double>", "less"]
TINY32 = numpy.finfo(numpy.float32).smallest_subnormal
TINY64 = numpy.finfo(numpy.float64).smallest_subnormal


@pytest.mark.parametrize("options", [(), ("-ftz=false",)])
def test_float32_denormals_are_flushed_as_on_the_gpu(options):
    m = EmulatedModule(DENORMALS, DENORMAL_NAMES, options=options)
    assert m.flush_denormals  # -ftz=false too: CuPy appends -ftz=true after the options
    a = numpy.array([1e-20, -1e-20, TINY32, 1e-20, 3], numpy.float32)
    b = numpy.array([1e-20, 1e-20, 1, 1e18, 2], numpy.float32)
    out = numpy.full(5, numpy.nan, numpy.float32)
    m.get_function("multiply<float>")((1,), (5,), (a, b, out))
    # denormal results flushed to a zero of their sign, a denormal input read as
    # zero; NumPy, without FTZ, keeps all three
    numpy.testing.assert_array_equal(out, [0, 0, 0, a[3] * b[3], 6])
    numpy.testing.assert_array_equal(numpy.signbit(out), [0, 1, 0, 0, 0])
    assert (a[:3] * b[:3] != 0).all()  # the launch left the host's FP mode as it was
    flags = numpy.zeros(2, numpy.int32)  # comparisons read denormals as zero too
    m.get_function("less")((1,), (2,), (numpy.array([TINY32, 2 * TINY32, 0, 1], numpy.float32),
                                        flags))
    numpy.testing.assert_array_equal(flags, [0, 1])
    a64, b64 = numpy.array([1e-160, TINY64]), numpy.array([1e-160, 1])
    out64 = numpy.zeros(2)
    m.get_function("multiply<double>")((1,), (2,), (a64, b64, out64))
    numpy.testing.assert_array_equal(out64, a64 * b64)  # double keeps its denormals, as on
    assert (out64 != 0).all()                            # the GPU


def test_the_last_ftz_option_decides():
    assert not emulator.flushes_denormals(())  # NVRTC's default
    assert emulator.flushes_denormals(("--std=c++14", "-ftz=true"))
    assert not emulator.flushes_denormals(("-ftz=true", "--ftz=false"))
    assert emulator.flushes_denormals(("-ftz=false", "--use_fast_math"))
    assert emulator.flushes_denormals(emulator.CUPY_APPENDED_OPTIONS)


# ---- the fibers' switch ----------------------------------------------------------------
# x86-64 switches fibers with cuda_emu.h's own few instructions; -DEMU_UCONTEXT builds
# the ucontext switch other machines use. Both must keep what a call keeps: twelve
# values live across every __syncwarp and __syncthreads (more than the callee-saved
# registers hold), and the launch's DAZ/FTZ after any number of switches.
SWITCH = r"""
__global__ void live_across_switches(const int* x, const float* tiny, int* out,
                                     float* flushed) {
    extern __shared__ unsigned char smem[];
    int* s = reinterpret_cast<int*>(smem);
    const int t = threadIdx.x;
    int v[12];
    for (int k = 0; k < 12; ++k) v[k] = x[t] * (k + 1) + k;
    int a = v[0], b = v[1], c = v[2], d = v[3], e = v[4], f = v[5];
    int g = v[6], h = v[7], i = v[8], j = v[9], k = v[10], l = v[11];
    for (int r = 0; r < 3; ++r) {
        s[t] = a;
        __syncwarp();
        a = s[t ^ 1] + b - c;  // the neighbouring lane's
        __syncwarp();
        s[t] = a;
        __syncthreads();
        a = s[blockDim.x - 1 - t] ^ (d + e * f);  // across warps
        __syncthreads();
    }
    out[t] = a + 3 * (b + c + d + e + f + g + h + i + j + k + l);
    flushed[t] = tiny[0] * 1.5f;
}
"""


def _live_across_switches_expected(x):
    n = x.size
    v = [x * (k + 1) + k for k in range(12)]
    a = v[0]
    for r in range(3):
        a = a[numpy.arange(n) ^ 1] + v[1] - v[2]
        a = a[::-1] ^ (v[3] + v[4] * v[5])
    return a + 3 * sum(v[1:])


@pytest.mark.parametrize("options", [(), ("-DEMU_UCONTEXT",)], ids=["own", "ucontext"])
@pytest.mark.parametrize("order", [0, 2])
def test_fibers_keep_registers_and_fp_mode_across_switches(options, order):
    m = EmulatedModule(SWITCH, ["live_across_switches"], options=options, order=order)
    assert m.flush_denormals
    x = numpy.arange(64, dtype=numpy.int32) * 7 - 100
    out = numpy.zeros(64, numpy.int32)
    flushed = numpy.full(64, numpy.nan, numpy.float32)
    tiny = numpy.array([TINY32], numpy.float32)
    for _ in range(2):  # the second launch reuses the fibers' stacks
        m.get_function("live_across_switches")((1,), (64,), (x, tiny, out, flushed),
                                               shared_mem=64 * 4)
        numpy.testing.assert_array_equal(out, _live_across_switches_expected(x))
        numpy.testing.assert_array_equal(flushed, 0)  # DAZ: TINY32 read as zero
    assert tiny[0] * numpy.float32(1.5) != 0  # the host's FP mode is as it was
