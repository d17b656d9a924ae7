// A CPU stand-in for the CUDA features gpucnn's kernels use, so that the same,
// unedited kernels/*.cu files compile with g++ and run on the CPU.
//
// Blocks run one at a time; the threads of a block run as cooperative fibers
// (ucontext) on one OS thread, switching only at __syncthreads(), which is a
// real barrier: no thread passes it before every live thread of its block has
// arrived. Between two barriers the threads run one after another in an order
// chosen per launch (emu::launch's `order`): 0 runs blocks and threads in index
// order, 1 in reverse index order, n >= 2 in a seeded shuffle drawn anew for
// every block and every barrier interval. A kernel without a race gives the same
// bits under every order; one that reads what another thread writes without a
// barrier between them gets a different answer (or NaN) under some order. What
// orders cannot show: a thread's run between two barriers is never interleaved
// with another's, so two threads updating one address in the same interval (a
// lost update on a GPU) look atomic here. Running a launch under two orders and
// comparing the bits (EmulatedModule's compare_order) catches such updates where
// their floating-point sum depends on the order; compute-sanitizer's racecheck
// on a GPU catches them all.
//
// Shared memory, as the driver has it: dynamic shared memory is the kernel's
// `extern __shared__ T name[];` (the loader in __init__.py turns it into a
// pointer to one arena, emu::dynamic_shared) and static `__shared__ T a[N];`
// arrays are one object per kernel (function-local statics, registered on first
// use). Both are filled with 0xFF bytes (a NaN in float and double, -1 in ints)
// before every block, so a missing barrier or a read of shared memory nobody
// wrote shows up as NaN; under AddressSanitizer the arena past the launch's
// dynamic size is poisoned too. Launches are checked against the limits the
// driver enforces on sm_90 (see check_launch); a static array's size is known
// only once a thread reaches it, so static + dynamic shared memory over the
// limit is reported when the launch ends.
//
// Barriers: every thread of a block must reach the same __syncthreads. The
// CUDA Programming Guide allows one in conditional code only where the
// condition evaluates identically across the block ("otherwise the code
// execution is likely to hang or produce unintended side effects"), and a
// `return` taken by some threads makes the barriers after it conditional. So a
// launch whose threads wait at __syncthreads calls on different source lines,
// or where a thread has exited while others wait at one, is refused with both
// places named. (The PTX ISA releases a bar.sync that only exited threads hold
// up, but nvcc treats __syncthreads as convergent and may move code across it
// on the assumption that the whole block gets there.)
//
// Float32 denormals: CuPy compiles every RawModule with -ftz=true (appended
// after the caller's options; NVRTC takes the last -ftz), so on the GPU f32
// arithmetic and comparisons treat denormal inputs as zero and flush denormal
// results to zero, while f64 keeps them. emu::launch does the same with SSE's
// DAZ and FTZ bits (MXCSR) for the launches of kernels that take float data
// and no double data (the bits cover f64 too, so a float kernel doing double
// arithmetic inside would be flushed where the GPU is not).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
// The loader rewrites every `extern __shared__` and static `__shared__`
// declaration it recognises (one variable each); anything else still gets the
// static storage a block shares, without the per-block 0xFF fill.
#define __shared__ static

namespace emu {
inline uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;

// The driver's limits for a launch on sm_90 (cuLaunchKernel, cuFuncSetAttribute).
constexpr unsigned long long kMaxGridX = 2147483647ull;  // 2^31 - 1
constexpr unsigned kMaxGridYZ = 65535;
constexpr unsigned kMaxBlockXY = 1024, kMaxBlockZ = 64, kMaxThreads = 1024;
constexpr std::size_t kDefaultSharedBytes = 48 * 1024;  // static + dynamic, without opt-in
constexpr std::size_t kMaxSharedBytes = 227 * 1024;     // per block, with opt-in (sm_90)

alignas(128) inline unsigned char dynamic_shared[kMaxSharedBytes];
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

using std::isnan;
using std::isinf;
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, sizeof f); return f; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, sizeof d); return d; }

namespace emu {

enum State { kReady, kAtBarrier, kDone };

struct Fiber {
    ucontext_t ctx;
    State state;
    uint3 tid;
    void* fake_stack;  // AddressSanitizer's bookkeeping for this fiber's stack
    const char* barrier_file;  // where it waits, while kAtBarrier
    unsigned barrier_line;
};

#ifdef EMU_ASAN
constexpr std::size_t kStackBytes = 128 * 1024;
#else
constexpr std::size_t kStackBytes = 64 * 1024;
#endif

inline ucontext_t scheduler;
inline Fiber* current = nullptr;
inline void (*body)(void*) = nullptr;
inline void* body_arg = nullptr;
inline std::vector<std::vector<char>> stacks;
#ifdef EMU_ASAN
inline const void* sched_stack_bottom = nullptr;
inline std::size_t sched_stack_size = 0;
#endif

// ---- static __shared__ arrays -------------------------------------------------
// Each one is a function-local static; the loader adds a call to shared_static
// after its declaration, so the first thread of every block to reach it fills
// it with 0xFF, and the launch learns the static shared memory it uses.
struct StaticShared {
    void* at;
    std::size_t bytes;
    unsigned long long block, launch;  // the block and launch that last filled it
};
inline std::vector<StaticShared> statics;
inline unsigned long long block_serial = 0, launch_serial = 0;
inline std::size_t static_bytes = 0;       // static shared memory of this launch
inline std::size_t dynamic_bytes = 0;      // dynamic shared memory of this launch
inline std::size_t shared_limit = 0;       // static + dynamic allowed for this launch
inline std::string launch_error;

inline void shared_static(void* at, std::size_t bytes) {
    StaticShared* s = nullptr;
    for (auto& e : statics)
        if (e.at == at) s = &e;
    if (s == nullptr) {
        statics.push_back({at, bytes, 0, 0});
        s = &statics.back();
    }
    if (s->launch != launch_serial) {
        s->launch = launch_serial;
        static_bytes += bytes;
        if (static_bytes + dynamic_bytes > shared_limit && launch_error.empty())
            launch_error = "too much shared memory: " + std::to_string(static_bytes) +
                           " bytes static + " + std::to_string(dynamic_bytes) +
                           " dynamic, over the limit of " + std::to_string(shared_limit);
    }
    if (s->block != block_serial) {
        s->block = block_serial;
        std::memset(at, 0xFF, bytes);
    }
}

// ---- the order threads and blocks run in ---------------------------------------
inline std::uint64_t splitmix64(std::uint64_t& state) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// perm = 0..n-1 in the order `order` runs them; seed tells apart the places
// (block, barrier interval) that draw a shuffle.
inline void arrange(std::vector<std::uint32_t>& perm, std::size_t n, unsigned order,
                    std::uint64_t seed) {
    perm.resize(n);
    for (std::size_t i = 0; i < n; ++i) perm[i] = (std::uint32_t)(order == 1 ? n - 1 - i : i);
    if (order < 2) return;
    std::uint64_t state = seed * 0x2545F4914F6CDD1Dull + order;
    for (std::size_t i = n; i > 1; --i) {
        const std::size_t j = splitmix64(state) % i;
        std::swap(perm[i - 1], perm[j]);
    }
}

// ---- fibers --------------------------------------------------------------------
// Switch from the running fiber back to the scheduler.
inline void yield_to_scheduler() {
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(&current->fake_stack, sched_stack_bottom, sched_stack_size);
#endif
    swapcontext(&current->ctx, &scheduler);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(current->fake_stack, nullptr, nullptr);
#endif
}

inline void fiber_main() {
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &sched_stack_bottom, &sched_stack_size);
#endif
    body(body_arg);
    current->state = kDone;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, sched_stack_bottom, sched_stack_size);
#endif
    setcontext(&scheduler);
}

inline void resume(Fiber& f, std::size_t i) {
    current = &f;
    thread_idx = f.tid;
#ifdef EMU_ASAN
    void* save = nullptr;
    __sanitizer_start_switch_fiber(&save, stacks[i].data(), kStackBytes);
#endif
    swapcontext(&scheduler, &f.ctx);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(save, nullptr, nullptr);
#endif
}

// ---- launch --------------------------------------------------------------------
// What cuLaunchKernel would refuse, as a message; empty when the launch is valid.
// max_dynamic is the kernel's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
// 48 KiB unless the launcher raised it (opted in), at most 227 KiB.
inline std::string check_launch(dim3 grid, dim3 block, std::size_t shared_bytes,
                                std::size_t max_dynamic) {
    auto dims = [](dim3 d) {
        return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " +
               std::to_string(d.z) + ")";
    };
    if (grid.x < 1 || grid.x > kMaxGridX || grid.y < 1 || grid.y > kMaxGridYZ || grid.z < 1 ||
        grid.z > kMaxGridYZ)
        return "grid " + dims(grid) + " is out of range: x must be 1..2^31-1, y and z 1..65535";
    if (block.x < 1 || block.x > kMaxBlockXY || block.y < 1 || block.y > kMaxBlockXY ||
        block.z < 1 || block.z > kMaxBlockZ)
        return "block " + dims(block) + " is out of range: x and y must be 1..1024, z 1..64";
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (threads > kMaxThreads)
        return "block " + dims(block) + " has " + std::to_string(threads) +
               " threads, over the limit of 1024";
    if (max_dynamic > kMaxSharedBytes)
        return "max_dynamic_shared_size_bytes " + std::to_string(max_dynamic) +
               " is over sm_90's 227 KiB";
    if (shared_bytes > max_dynamic)
        return "dynamic shared memory of " + std::to_string(shared_bytes) +
               " bytes is over the kernel's limit of " + std::to_string(max_dynamic) +
               (max_dynamic <= kDefaultSharedBytes
                    ? " (48 KiB unless the launcher opts in by raising "
                      "max_dynamic_shared_size_bytes)"
                    : " (its max_dynamic_shared_size_bytes)");
    return "";
}

inline std::string where(uint3 v) {
    return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) +
           ")";
}

// After a barrier interval: why the barrier the block's live threads wait at
// would not work on a GPU, or "" (also when nobody waits: the block is done).
inline std::string check_barrier(const std::vector<Fiber>& fibers) {
    const Fiber* waiting = nullptr;
    const Fiber* exited = nullptr;
    for (const Fiber& f : fibers) {
        if (f.state == kDone) {
            if (exited == nullptr) exited = &f;
            continue;
        }
        if (waiting == nullptr) {
            waiting = &f;
        } else if (f.barrier_line != waiting->barrier_line ||
                   std::strcmp(f.barrier_file, waiting->barrier_file) != 0) {
            return "divergent __syncthreads in block " + where(block_idx) + ": thread " +
                   where(waiting->tid) + " waits at " + waiting->barrier_file + ":" +
                   std::to_string(waiting->barrier_line) + ", thread " + where(f.tid) + " at " +
                   f.barrier_file + ":" + std::to_string(f.barrier_line) +
                   " (a barrier in conditional code needs a condition that evaluates the same "
                   "across the block)";
        }
    }
    if (waiting != nullptr && exited != nullptr)
        return "thread " + where(exited->tid) + " of block " + where(block_idx) +
               " exited while thread " + where(waiting->tid) + " waits at the __syncthreads at " +
               waiting->barrier_file + ":" + std::to_string(waiting->barrier_line) +
               " (every thread of a block must reach each barrier)";
    return "";
}

// The SSE control bits for f32 on a GPU compiled with -ftz=true: denormal
// inputs read as zero (DAZ, bit 6) and denormal results flushed to zero (FTZ,
// bit 15). Set for a launch; the fibers inherit them through getcontext.
class FlushDenormals {
  public:
    explicit FlushDenormals(bool on) : on_(on) {
#if defined(__SSE__)
        if (on_) {
            saved_ = _mm_getcsr();
            _mm_setcsr(saved_ | 0x8040u);
        }
#endif
    }
    ~FlushDenormals() {
#if defined(__SSE__)
        if (on_) _mm_setcsr(saved_);
#endif
    }
    FlushDenormals(const FlushDenormals&) = delete;
    FlushDenormals& operator=(const FlushDenormals&) = delete;

  private:
    bool on_;
    unsigned saved_ = 0;
};

// Run body(arg) for every thread of every block of the grid; returns what the
// driver would have refused (nothing runs then), a barrier the
// threads of a block do not all reach, or "".
inline std::string run_grid(dim3 grid, dim3 block, std::size_t shared_bytes,
                            std::size_t max_dynamic, unsigned order, bool flush_denormals,
                            void (*fn)(void*), void* arg) {
    std::string error = check_launch(grid, block, shared_bytes, max_dynamic);
    if (!error.empty()) return error;
#if !defined(__SSE__)
    if (flush_denormals) return "flushing float32 denormals is emulated on x86 (SSE) only";
#endif
    FlushDenormals ftz(flush_denormals);
    const std::size_t nthreads = (std::size_t)block.x * block.y * block.z;
    const std::size_t nblocks = (std::size_t)grid.x * grid.y * grid.z;
    body = fn;
    body_arg = arg;
    grid_dim = grid;
    block_dim = block;
    ++launch_serial;
    static_bytes = 0;
    dynamic_bytes = shared_bytes;
    shared_limit = max_dynamic > kDefaultSharedBytes ? kMaxSharedBytes : kDefaultSharedBytes;
    launch_error.clear();
    if (stacks.size() < nthreads) stacks.resize(nthreads);
    for (std::size_t i = 0; i < nthreads; ++i)
        if (stacks[i].size() != kStackBytes) stacks[i].assign(kStackBytes, 0);
    std::vector<Fiber> fibers(nthreads);
    std::vector<std::uint32_t> blocks, threads;
    arrange(blocks, nblocks, order, 0);
#ifdef EMU_ASAN
    // Past the launch's dynamic shared memory, any access is a bug.
    const std::size_t used = (shared_bytes + 7) / 8 * 8;
    ASAN_POISON_MEMORY_REGION(dynamic_shared + used, kMaxSharedBytes - used);
#endif
    std::string barrier_error;
    for (std::size_t b : blocks) {
        block_idx = {(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y),
                     (unsigned)(b / grid.x / grid.y)};
        ++block_serial;
        std::memset(dynamic_shared, 0xFF, shared_bytes);
        std::size_t i = 0;
        for (unsigned tz = 0; tz < block.z; ++tz)
        for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx, ++i) {
            Fiber& f = fibers[i];
            f.tid = {tx, ty, tz};
            f.state = kReady;
            f.fake_stack = nullptr;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = stacks[i].data();
            f.ctx.uc_stack.ss_size = kStackBytes;
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_main, 0);
        }
        for (std::uint64_t interval = 0;; ++interval) {
            arrange(threads, nthreads, order, (b + 1) * 0x100000001B3ull + interval);
            for (std::uint32_t t : threads)
                if (fibers[t].state == kReady) resume(fibers[t], t);
            // Every live thread now waits at a barrier, or all are done.
            barrier_error = check_barrier(fibers);
            if (!barrier_error.empty()) break;
            bool waiting = false;
            for (auto& f : fibers)
                if (f.state == kAtBarrier) { f.state = kReady; waiting = true; }
            if (!waiting) break;
        }
        if (!barrier_error.empty()) break;  // the waiting fibers are abandoned
    }
#ifdef EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(dynamic_shared + used, kMaxSharedBytes - used);
    // An abandoned fiber leaves its frames' redzones poisoned on its stack,
    // which the next launch's fibers reuse.
    if (!barrier_error.empty())
        for (std::size_t i = 0; i < nthreads; ++i)
            ASAN_UNPOISON_MEMORY_REGION(stacks[i].data(), kStackBytes);
#endif
    return launch_error.empty() ? barrier_error : launch_error;
}

// ---- kernel parameter types ----------------------------------------------------------
// The C spelling of a kernel's parameter types, for the Python side to check
// each argument's NumPy type against (as CuPy packs arguments by their NumPy
// type, whatever the kernel declares).
template <typename T> struct CName { static constexpr const char* name = nullptr; };
#define EMU_CNAME(T, spelled) \
    template <> struct CName<T> { static constexpr const char* name = spelled; };
EMU_CNAME(void, "void")
EMU_CNAME(bool, "bool")
EMU_CNAME(char, "char")
EMU_CNAME(signed char, "signed char")
EMU_CNAME(unsigned char, "unsigned char")
EMU_CNAME(short, "short")
EMU_CNAME(unsigned short, "unsigned short")
EMU_CNAME(int, "int")
EMU_CNAME(unsigned, "unsigned int")
EMU_CNAME(long, "long")
EMU_CNAME(unsigned long, "unsigned long")
EMU_CNAME(long long, "long long")
EMU_CNAME(unsigned long long, "unsigned long long")
EMU_CNAME(float, "float")
EMU_CNAME(double, "double")
#undef EMU_CNAME

template <typename T>
std::string type_name() {
    if constexpr (std::is_pointer_v<T>) {
        using P = std::remove_pointer_t<T>;
        const char* base = CName<std::remove_cv_t<P>>::name;
        if (base == nullptr) return "?";
        return std::string(std::is_const_v<P> ? "const " : "") + base + "*";
    } else {
        const char* base = CName<std::remove_cv_t<T>>::name;
        return base == nullptr ? "?" : base;
    }
}

// "type;type;...;" of a kernel's parameters ("?" for a type the check does not know).
template <typename... A>
const char* signature(void (*)(A...)) {
    static const std::string s = [] {
        std::string out;
        ((out += type_name<A>() + ";"), ...);
        return out;
    }();
    return s.c_str();
}

// A parameter of type T is an E, or points at one.
template <typename T, typename E>
constexpr bool refers_to = std::is_same_v<std::remove_cv_t<std::remove_pointer_t<T>>, E>;

template <typename... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// The kernel parameters arrive as cuLaunchKernel's do: args[i] points at the
// value of the i-th parameter. Returns nullptr, or why the launch was refused.
// ftz: the module was compiled with -ftz=true; it applies to the kernels that
// take float (or float*) parameters and no double ones.
template <typename... A>
const char* launch(void (*kernel)(A...), dim3 grid, dim3 block, std::size_t shared_bytes,
                   std::size_t max_dynamic, unsigned order, bool ftz, void** args) {
    struct Call { void (*kernel)(A...); void** args; } c{kernel, args};
    constexpr bool takes_float = (false || ... || refers_to<A, float>);
    constexpr bool takes_double = (false || ... || refers_to<A, double>);
    static std::string error;
    error = run_grid(grid, block, shared_bytes, max_dynamic, order,
                     ftz && takes_float && !takes_double, [](void* p) {
        auto* c = static_cast<Call*>(p);
        call(c->kernel, c->args, std::index_sequence_for<A...>{});
    }, &c);
    return error.empty() ? nullptr : error.c_str();
}

}  // namespace emu

// The call site (GCC evaluates __builtin_LINE and __builtin_FILE in a default
// argument where the call is) tells the barriers apart.
inline void __syncthreads(unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    emu::current->state = emu::kAtBarrier;
    emu::current->barrier_file = file;
    emu::current->barrier_line = line;
    emu::yield_to_scheduler();
}

// ---- what the implicit-GEMM conv kernels use ----------
// Vector types for the 128-bit shared-memory reads (16-byte aligned, as on the GPU),
// and __launch_bounds__, a compiler hint with no effect on the CPU.
#define GPUCNN_EMULATOR 1
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
// ---- end of the kernels branch's section -----------------------------------------

// ---- cp.async with semantics that catch a missing wait ---
// Each thread queues its copies; cp_async_commit() closes a group; cp_async_wait<N>()
// performs every group but the N newest. Only then does the data land in shared
// memory, so a kernel that reads a stage it did not wait for reads the 0xFF
// poison (NaN). A thread's queue belongs to its block and launch: copies left
// pending when either ends are dropped (on a GPU they land after nobody reads them).
#include <cstdio>
namespace emu_async {
struct Copy { void* dst; const void* src; std::size_t bytes, valid; };
struct Queue {
    std::vector<std::vector<Copy>> groups;
    std::vector<Copy> open;
    uint3 block{~0u, ~0u, ~0u};
};
inline std::vector<Queue> queues;
inline void reset() { queues.clear(); }
inline Queue& queue() {
    const std::size_t t =
        ((std::size_t)threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    if (queues.size() <= t) queues.resize(t + 1);
    Queue& q = queues[t];
    if (q.block.x != blockIdx.x || q.block.y != blockIdx.y || q.block.z != blockIdx.z) {
        q = Queue{};
        q.block = blockIdx;
    }
    return q;
}
}  // namespace emu_async

template <typename T>
inline void cp_async(T* dst, const T* src, bool valid) {
    emu_async::queue().open.push_back({dst, src, sizeof(T), valid ? sizeof(T) : 0});
}
inline void cp_async_commit() {
    auto& q = emu_async::queue();
    q.groups.push_back(std::move(q.open));
    q.open.clear();
}
template <int N>
inline void cp_async_wait() {
    auto& q = emu_async::queue();
    while (q.groups.size() > (std::size_t)N) {
        for (const auto& c : q.groups.front()) {
            std::memcpy(c.dst, c.src, c.valid);
            std::memset(static_cast<char*>(c.dst) + c.valid, 0, c.bytes - c.valid);
        }
        q.groups.erase(q.groups.begin());
    }
}
// ---- end of the kernels branch's cp.async section ----------------------------------
