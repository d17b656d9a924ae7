// A CPU stand-in for the CUDA features gpucnn's kernels use, so that the same,
// unedited kernels/*.cu files compile with g++ and run on the CPU.
//
// Blocks run one at a time; the threads of a block run as cooperative fibers
// (ucontext) on one OS thread, switching only at __syncthreads(), which is a
// real barrier: no thread passes it before every live thread of its block has
// arrived. Dynamic shared memory is the one array `extern __shared__ unsigned
// char smem[]` (the name the kernels use); it is filled with 0xFF bytes (a NaN
// in float and double) before every block, so a missing barrier or a read of
// shared memory nobody wrote shows up as NaN. Static __shared__ arrays are not
// supported: kernels here use dynamic shared memory only.
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
#define __shared__

namespace emu {
inline uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
constexpr std::size_t kSharedBytes = 48 * 1024;
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

alignas(16) inline unsigned char smem[emu::kSharedBytes];

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

// Run body(arg) for every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, std::size_t shared_bytes, void (*fn)(void*), void* arg) {
    const std::size_t nthreads = (std::size_t)block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024)
        throw std::invalid_argument("block size must be 1..1024 threads, got " + std::to_string(nthreads));
    if (shared_bytes > kSharedBytes)
        throw std::invalid_argument("dynamic shared memory over 48 KiB: " + std::to_string(shared_bytes));
    body = fn;
    body_arg = arg;
    grid_dim = grid;
    block_dim = block;
    if (stacks.size() < nthreads) stacks.resize(nthreads);
    for (std::size_t i = 0; i < nthreads; ++i)
        if (stacks[i].size() != kStackBytes) stacks[i].assign(kStackBytes, 0);
    std::vector<Fiber> fibers(nthreads);
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = {bx, by, bz};
        std::memset(smem, 0xFF, sizeof smem);
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
        for (;;) {
            for (std::size_t t = 0; t < nthreads; ++t)
                if (fibers[t].state == kReady) resume(fibers[t], t);
            // Every live thread now waits at the barrier, or all are done.
            bool waiting = false;
            for (auto& f : fibers)
                if (f.state == kAtBarrier) { f.state = kReady; waiting = true; }
            if (!waiting) break;
        }
    }
}

template <typename... A, std::size_t... I>
void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// The kernel parameters arrive as cuLaunchKernel's do: args[i] points at the
// value of the i-th parameter.
template <typename... A>
void launch(void (*kernel)(A...), dim3 grid, dim3 block, std::size_t shared_bytes, void** args) {
    struct Call { void (*kernel)(A...); void** args; } c{kernel, args};
    run_grid(grid, block, shared_bytes, [](void* p) {
        auto* c = static_cast<Call*>(p);
        call(c->kernel, c->args, std::index_sequence_for<A...>{});
    }, &c);
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
