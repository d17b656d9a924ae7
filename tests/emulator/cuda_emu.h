// A CPU stand-in for the CUDA features gpucnn's kernels use, so that the same,
// unedited kernels/*.cu files compile with g++ and run on the CPU.
//
// Blocks run one at a time; the threads of a block run as cooperative fibers
// (a stack switch of a few instructions on x86-64, ucontext elsewhere; see
// ---- fibers) on one OS thread, switching only at __syncthreads(), which is a
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
// Warps: the threads of a block form warps of 32 by linear thread index, as in
// CUDA. A warp-collective (mma.sync, __syncwarp) is a second kind of wait: a
// lane that reaches one waits until every lane of its warp waits at the same
// one (same kind and call site); the collective then executes once, for the
// whole warp, and its lanes run on within the same barrier interval (in a
// freshly drawn order), while lanes at __syncthreads keep waiting for the
// block. mma.sync.aligned needs all 32 lanes; __syncwarp, as the Programming
// Guide words it, the lanes that have not exited. A warp whose lanes wait at
// different collectives, or at a collective and at __syncthreads, or (for mma)
// that has an exited lane or fewer than 32 lanes, is refused with the places
// named. What this does not show: a kernel that relies on mma.sync to order
// its lanes' shared-memory accesses passes here, as if it were __syncwarp.
//
// Float32 denormals: CuPy compiles every RawModule with -ftz=true (appended
// after the caller's options; NVRTC takes the last -ftz), so on the GPU f32
// arithmetic and comparisons treat denormal inputs as zero and flush denormal
// results to zero, while f64 keeps them. emu::launch does the same with SSE's
// DAZ and FTZ bits (MXCSR) for the launches of kernels that take float data
// and no double data (the bits cover f64 too, so a float kernel doing double
// arithmetic inside would be flushed where the GPU is not).
#pragma once
// The fibers' switch: hand-written on x86-64 (EMU_UCONTEXT forces ucontext there too).
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_FAST_SWITCH 1
#else
#include <ucontext.h>
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
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

enum State { kReady, kAtBarrier, kAtWarp, kDone };

// A call site, taken where the call is written (GCC evaluates __builtin_LINE and
// __builtin_FILE in a default argument at the call, also through a chain of
// defaulted Site parameters), so that a device function wrapping a collective
// can pass on its own caller's place.
struct Site {
    const char* file;
    unsigned line;
    Site(unsigned l = __builtin_LINE(), const char* f = __builtin_FILE()) : file(f), line(l) {}
};

enum class Collective { kMma, kSyncwarp };

// What a lane brings to the warp-collective it waits at.
struct WarpCall {
    Collective kind;
    unsigned mask;  // __syncwarp's
    const unsigned* a;  // mma's fragments, in the lane's own registers (its stack)
    const unsigned* b;
    const float* c;
    float* d;
};

#ifdef EMU_FAST_SWITCH
using Context = void*;  // the suspended stack's pointer, at its saved registers
#else
using Context = ucontext_t;
#endif

struct Fiber {
    Context ctx;
    State state;
    uint3 tid;
    void* fake_stack;  // AddressSanitizer's bookkeeping for this fiber's stack
    const char* barrier_file;  // where it waits, while kAtBarrier or kAtWarp
    unsigned barrier_line;
    WarpCall call;  // while kAtWarp
};

#ifdef EMU_ASAN
constexpr std::size_t kStackBytes = 128 * 1024;
#else
constexpr std::size_t kStackBytes = 64 * 1024;
#endif

// The inline variables here are one object per process (GNU unique symbols),
// shared by every module loaded; the scheduler's is named for its switch, as
// the two switches' Contexts differ in size.
#ifdef EMU_FAST_SWITCH
inline namespace own_switch { inline Context scheduler; }
#else
inline namespace ucontext_switch { inline Context scheduler; }
#endif
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

// A vector access's address must be a multiple of its size, or the GPU faults
// ("misaligned address"): the launch fails, naming the access, and the access must
// not run (the host's aligned vector instructions would fault too). Returns whether
// it may.
inline bool check_aligned(const void* p, std::size_t bytes, const char* what) {
    const std::size_t past = reinterpret_cast<std::uintptr_t>(p) % bytes;
    if (past != 0 && launch_error.empty())
        launch_error = std::string("misaligned address: ") + what + " of " +
                       std::to_string(bytes) + " bytes at an address " + std::to_string(past) +
                       " bytes past a multiple of " + std::to_string(bytes);
    return past == 0;
}

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
// Every mma.sync and __syncwarp makes all 32 lanes switch out and back, so the
// switch is on the emulator's hot path. glibc's swapcontext saves and restores
// the signal mask with a system call (about 0.4 us a switch); the fibers never
// touch the mask, so on x86-64 a switch keeps only what the SysV ABI says a
// call preserves: rbx, rbp, r12-r15, the stack pointer, and the x87 control
// word and MXCSR. Those two are kept per fiber, as swapcontext keeps them: a
// fiber starts with the MXCSR the scheduler has when it makes the fiber (a
// launch's DAZ/FTZ, see FlushDenormals), and the scheduler gets its own back
// at every switch to it.
inline void fiber_main();

#ifdef EMU_FAST_SWITCH
// emu_switch_stacks(void** save, void* next): suspend the running stack
// (its pointer to *save) and resume `next`, where an earlier call suspended it
// or make_context built its first frame. emu_fiber_entry: where a new fiber's
// first switch returns to; it calls fiber_main, which never returns. Local
// symbols, so that every library built from this header has its own.
extern "C" void emu_switch_stacks(void** save, void* next) __attribute__((visibility("hidden")));
extern "C" void emu_fiber_entry() __attribute__((visibility("hidden")));
asm(".pushsection .text\n"
    ".p2align 4\n"
    ".type emu_switch_stacks, @function\n"
    "emu_switch_stacks:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $16, %rsp\n"
    "    stmxcsr 8(%rsp)\n"
    "    fnstcw (%rsp)\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    ldmxcsr 8(%rsp)\n"
    "    fldcw (%rsp)\n"
    "    addq $16, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size emu_switch_stacks, .-emu_switch_stacks\n"
    ".p2align 4\n"
    ".type emu_fiber_entry, @function\n"
    "emu_fiber_entry:\n"
    // No caller: debuggers' and unwinders' backtraces of a fiber end here
    // (and the frame-pointer chain at the rbp of 0 in the first frame).
    "    .cfi_startproc\n"
    "    .cfi_undefined rip\n"
    "    call *%r12\n"  // fiber_main, put in r12 by make_context's frame
    "    ud2\n"
    "    .cfi_endproc\n"
    ".size emu_fiber_entry, .-emu_fiber_entry\n"
    ".popsection\n");

inline void switch_context(Context& save, Context& next) { emu_switch_stacks(&save, next); }

// A fiber's first frame, as emu_switch_stacks leaves a suspended stack: from the
// stack pointer up, the x87 control word and MXCSR (16 bytes), r15, r14, r13,
// r12, rbx, rbp, and the address it returns to. The ret pops that address with
// the stack pointer at the 16-byte aligned top, so the trampoline's call enters
// fiber_main aligned as the SysV ABI has it.
inline void make_context(Context& ctx, char* stack, std::size_t bytes) {
    const std::uintptr_t top =
        (reinterpret_cast<std::uintptr_t>(stack) + bytes) & ~std::uintptr_t(15);
    auto* frame = reinterpret_cast<std::uint64_t*>(top) - 9;
#ifdef EMU_ASAN
    // A frame of the stack's previous fiber may have left redzones here.
    ASAN_UNPOISON_MEMORY_REGION(frame, 9 * sizeof(std::uint64_t));
#endif
    std::uint16_t fcw;
    std::uint32_t mxcsr;
    asm volatile("fnstcw %0\n\tstmxcsr %1" : "=m"(fcw), "=m"(mxcsr));
    frame[0] = fcw;
    frame[1] = mxcsr;
    frame[2] = frame[3] = frame[4] = 0;  // r15, r14, r13
    frame[5] = reinterpret_cast<std::uint64_t>(&fiber_main);  // r12
    frame[6] = frame[7] = 0;  // rbx, rbp
    frame[8] = reinterpret_cast<std::uint64_t>(&emu_fiber_entry);
    ctx = frame;
}

// The running fiber has ended; what the switch saves is never resumed.
[[noreturn]] inline void exit_to(Context& next) {
    emu_switch_stacks(&current->ctx, next);
    __builtin_unreachable();
}
#else
inline void switch_context(Context& save, Context& next) { swapcontext(&save, &next); }

// getcontext takes the scheduler's floating-point state (MXCSR) for the fiber.
inline void make_context(Context& ctx, char* stack, std::size_t bytes) {
    getcontext(&ctx);
    ctx.uc_stack.ss_sp = stack;
    ctx.uc_stack.ss_size = bytes;
    ctx.uc_link = nullptr;
    makecontext(&ctx, fiber_main, 0);
}

[[noreturn]] inline void exit_to(Context& next) {
    setcontext(&next);
    std::abort();
}
#endif

// Switch from the running fiber back to the scheduler.
inline void yield_to_scheduler() {
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(&current->fake_stack, sched_stack_bottom, sched_stack_size);
#endif
    switch_context(current->ctx, scheduler);
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
    exit_to(scheduler);
}

inline void resume(Fiber& f, std::size_t i) {
    current = &f;
    thread_idx = f.tid;
#ifdef EMU_ASAN
    void* save = nullptr;
    __sanitizer_start_switch_fiber(&save, stacks[i].data(), kStackBytes);
#endif
    switch_context(scheduler, f.ctx);
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

// ---- warp-collectives ------------------------------------------------------------
// The tensor-core instructions, as kernels/tensor_core.cuh calls them.
//
// cvt.rna.tf32.f32. The PTX ISA gives its rounding (.rna: to nearest, ties away
// from zero, keeping 10 explicit mantissa bits) and calls TF32's layout
// implementation-defined; what happens to the other classes is what ptxas
// compiles the instruction to (sm_80 to sm_90: FSETP.GEU |x|, +INF; IADD 0x1000
// where that is false; LOP3 with 0xffffe000), and is done here the same way on
// the bit pattern, so the emulator's DAZ/FTZ (a float kernel's MXCSR) cannot
// touch it: finite values round on their magnitude, subnormals included (the
// instruction has no .ftz), -0 stays -0, a value at or past the last TF32
// interval (0x7f7ff000 up) rounds to infinity; infinities and NaNs are only
// truncated, so a NaN whose payload lies all in the low 13 bits becomes an
// infinity of its sign.
inline unsigned cvt_rna_tf32(float x) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) < 0x7f800000u) bits += 0x1000u;  // carries into the exponent
    return bits & 0xffffe000u;
}

// A TF32 operand as the tensor core reads it: the low 13 bits of the register
// are not part of the value (CUTLASS calls them don't-care), so an operand that
// was never rounded is truncated, and a kernel that forgets cvt.rna gets other
// numbers than one that rounds.
inline float tf32_operand(unsigned bits) {
    bits &= 0xffffe000u;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 for one warp; lanes[i] is
// lane i's call. The fragment layouts are the PTX ISA's ("Matrix Fragments for
// mma.m16n8k8", .tf32), with g = lane >> 2 and t = lane & 3:
//   A (16x8): a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//   B (8x8):  b0 = B[t][g], b1 = B[t+4][g]
//   C, D (16x8): c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// The arithmetic is a model, not the tensor core's own adder (which NVIDIA does
// not document): D[i][j] = float(double(C[i][j]) + sum over k = 0..7, in that
// order, of double(A[i][k]) * double(B[k][j])). Each product of two TF32 values
// is exact in double and the one rounding is to float at the end, so the model
// is deterministic and what NumPy computes in float64 with the same order. In
// a float kernel the launch's DAZ/FTZ apply: a subnormal A, B or C element
// reads as zero and a subnormal D is flushed. C is read whole before D is
// written, so d may be c.
inline void mma_m16n8k8_tf32_warp(const WarpCall* lanes) {
    float A[16][8], B[8][8], C[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane >> 2, t = lane & 3;
        const WarpCall& l = lanes[lane];
        A[g][t] = tf32_operand(l.a[0]);
        A[g + 8][t] = tf32_operand(l.a[1]);
        A[g][t + 4] = tf32_operand(l.a[2]);
        A[g + 8][t + 4] = tf32_operand(l.a[3]);
        B[t][g] = tf32_operand(l.b[0]);
        B[t + 4][g] = tf32_operand(l.b[1]);
        C[g][2 * t] = l.c[0];
        C[g][2 * t + 1] = l.c[1];
        C[g + 8][2 * t] = l.c[2];
        C[g + 8][2 * t + 1] = l.c[3];
    }
    float D[16][8];
    for (unsigned i = 0; i < 16; ++i)
        for (unsigned j = 0; j < 8; ++j) {
            double sum = C[i][j];
            for (unsigned k = 0; k < 8; ++k) sum += (double)A[i][k] * (double)B[k][j];
            D[i][j] = (float)sum;
        }
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane >> 2, t = lane & 3;
        float* d = lanes[lane].d;
        d[0] = D[g][2 * t];
        d[1] = D[g][2 * t + 1];
        d[2] = D[g + 8][2 * t];
        d[3] = D[g + 8][2 * t + 1];
    }
}

inline const char* collective_name(Collective kind) {
    return kind == Collective::kMma ? "mma.sync" : "__syncwarp";
}

// Where a fiber stands, for an error message: "waits at the mma.sync at f:l".
inline std::string standing(const Fiber& f) {
    if (f.state == kDone) return "has exited";
    const char* what = f.state == kAtWarp ? collective_name(f.call.kind) : "__syncthreads";
    return std::string("waits at the ") + what + " at " + f.barrier_file + ":" +
           std::to_string(f.barrier_line);
}

// After every live thread of the block has stopped: execute each warp-collective
// that all the lanes it needs wait at, and make those lanes ready (released
// tells whether any did); or say why a warp's collective can never execute.
inline std::string run_warp_collectives(std::vector<Fiber>& fibers, bool& released) {
    const std::size_t n = fibers.size();
    for (std::size_t w0 = 0; w0 < n; w0 += 32) {
        const std::size_t w1 = n < w0 + 32 ? n : w0 + 32;
        const Fiber* first = nullptr;
        for (std::size_t i = w0; i < w1 && first == nullptr; ++i)
            if (fibers[i].state == kAtWarp) first = &fibers[i];
        if (first == nullptr) continue;
        const std::string warp = "warp " + std::to_string(w0 / 32) + " of block " +
                                 where(block_idx);
        const Collective kind = first->call.kind;
        for (std::size_t i = w0; i < w1; ++i) {
            const Fiber& f = fibers[i];
            if (f.state == kAtWarp && f.call.kind == kind &&
                f.barrier_line == first->barrier_line &&
                std::strcmp(f.barrier_file, first->barrier_file) == 0) {
                if (kind == Collective::kSyncwarp && f.call.mask != 0xffffffffu) {
                    char mask[11];
                    std::snprintf(mask, sizeof mask, "0x%08x", f.call.mask);
                    return std::string("__syncwarp(") + mask + ") at " + f.barrier_file + ":" +
                           std::to_string(f.barrier_line) + " in " + warp +
                           ": the emulator implements only the full mask 0xffffffff";
                }
                continue;
            }
            if (f.state == kDone && kind == Collective::kSyncwarp) continue;  // not waited for
            return warp + " diverges at a warp-collective: thread " + where(first->tid) + " " +
                   standing(*first) + ", thread " + where(f.tid) + " " + standing(f) +
                   (kind == Collective::kMma
                        ? " (mma.sync.aligned must be executed by all 32 lanes of the warp, at "
                          "the same instruction)"
                        : " (__syncwarp waits for every lane of the warp that has not exited, "
                          "at the same call)");
        }
        if (kind == Collective::kMma && w1 - w0 < 32)
            return warp + " has " + std::to_string(w1 - w0) + " threads, and the mma.sync at " +
                   first->barrier_file + ":" + std::to_string(first->barrier_line) +
                   " needs all 32 lanes (a block size of " + std::to_string(n) +
                   " threads is not a multiple of 32)";
        if (kind == Collective::kMma) {
            WarpCall lanes[32];
            for (std::size_t i = w0; i < w1; ++i) lanes[i - w0] = fibers[i].call;
            mma_m16n8k8_tf32_warp(lanes);
        }
        for (std::size_t i = w0; i < w1; ++i)
            if (fibers[i].state == kAtWarp) fibers[i].state = kReady;
        released = true;
    }
    return "";
}

// The running lane waits at a warp-collective; returns once its warp executed it.
inline void wait_at_warp(const WarpCall& call, const Site& site) {
    current->state = kAtWarp;
    current->call = call;
    current->barrier_file = site.file;
    current->barrier_line = site.line;
    yield_to_scheduler();
}

inline void mma_m16n8k8_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                             const float (&c)[4], Site site = Site()) {
    wait_at_warp({Collective::kMma, 0u, a, b, c, d}, site);
}

// The SSE control bits for f32 on a GPU compiled with -ftz=true: denormal
// inputs read as zero (DAZ, bit 6) and denormal results flushed to zero (FTZ,
// bit 15). Set for a launch; the fibers take them from the scheduler when
// make_context makes them.
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
    std::string barrier_error;  // or a warp-collective's
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
            make_context(f.ctx, stacks[i].data(), kStackBytes);
        }
        for (std::uint64_t interval = 0;; ++interval) {
            // Rounds: after each, the warps whose lanes all wait at a collective
            // execute it, and those lanes run on, in an order drawn anew.
            for (std::uint64_t round = 0;; ++round) {
                arrange(threads, nthreads, order,
                        (b + 1) * 0x100000001B3ull + interval + round * 0x9E3779B97F4A7C15ull);
                for (std::uint32_t t : threads)
                    if (fibers[t].state == kReady) resume(fibers[t], t);
                bool released = false;
                barrier_error = run_warp_collectives(fibers, released);
                if (!barrier_error.empty() || !released) break;
            }
            if (!barrier_error.empty()) break;
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

// __syncwarp: a barrier for the lanes of a warp that have not exited (the only
// mask the emulator takes is the full one). Without it, lanes exchanging data
// through shared memory read the 0xFF poison under some thread order.
inline void __syncwarp(unsigned mask = 0xffffffffu, emu::Site site = emu::Site()) {
    emu::wait_at_warp({emu::Collective::kSyncwarp, mask, nullptr, nullptr, nullptr, nullptr}, site);
}

inline unsigned __float_as_uint(float v) { unsigned u; std::memcpy(&u, &v, sizeof u); return u; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, sizeof f); return f; }

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
