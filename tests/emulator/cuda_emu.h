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

// Run body(arg) for every thread of every block of the grid; returns what the
// driver would have refused (nothing runs then), or "".
inline std::string run_grid(dim3 grid, dim3 block, std::size_t shared_bytes,
                            std::size_t max_dynamic, unsigned order, void (*fn)(void*),
                            void* arg) {
    std::string error = check_launch(grid, block, shared_bytes, max_dynamic);
    if (!error.empty()) return error;
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
            // Every live thread now waits at the barrier, or all are done.
            bool waiting = false;
            for (auto& f : fibers)
                if (f.state == kAtBarrier) { f.state = kReady; waiting = true; }
            if (!waiting) break;
        }
    }
#ifdef EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(dynamic_shared + used, kMaxSharedBytes - used);
#endif
    return launch_error;
}

template <typename... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// The kernel parameters arrive as cuLaunchKernel's do: args[i] points at the
// value of the i-th parameter. Returns nullptr, or why the launch was refused.
template <typename... A>
const char* launch(void (*kernel)(A...), dim3 grid, dim3 block, std::size_t shared_bytes,
                   std::size_t max_dynamic, unsigned order, void** args) {
    struct Call { void (*kernel)(A...); void** args; } c{kernel, args};
    static std::string error;
    error = run_grid(grid, block, shared_bytes, max_dynamic, order, [](void* p) {
        auto* c = static_cast<Call*>(p);
        call(c->kernel, c->args, std::index_sequence_for<A...>{});
    }, &c);
    return error.empty() ? nullptr : error.c_str();
}

}  // namespace emu

inline void __syncthreads() {
    emu::current->state = emu::kAtBarrier;
    emu::yield_to_scheduler();
}

// ---- kernels branch (issue 8): what the implicit-GEMM conv kernels use ----------
// Vector types for the 128-bit shared-memory reads (16-byte aligned, as on the GPU),
// and __launch_bounds__, a compiler hint with no effect on the CPU.
#define GPUCNN_EMULATOR 1
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
// ---- end of the kernels branch's section -----------------------------------------

// ---- kernels branch (issue 8): cp.async with semantics that catch a missing wait ---
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
