// Convolution as implicit GEMM: forward, backward-data and backward-filter share
// one tiled main loop (gemm_tile) and differ only in how their two operands and
// their output are addressed (an IndexMap for each, as CUTLASS's fprop, dgrad
// and wgrad iterators differ). Nothing is materialised: the im2col matrix is
// gathered tile by tile into shared memory.
//
// Layouts: x, dx (N,C,H,W); w, dw (K,C/groups,R,S); y, dy (N,K,P,Q); contiguous.
// Every output element is written once by the thread that accumulated it, in a
// fixed order: no atomics, bitwise repeatable for a given configuration.
//
// The tile configuration comes from the loader as -D options, and only from there:
// gpucnn/backends/cuda/conv.py owns the named configurations (conv_options).
//   CONV_BM, CONV_BN   rows, columns of the block tile
//   CONV_BK            reduction depth of one shared-memory stage, float;
//   CONV_BK_DOUBLE     the same for double
//   CONV_TM, CONV_TN   rows, columns per thread (multiples of 4)
//   CONV_PAD           elements of padding per shared-memory row (see conv::PAD)
//   CONV_UNROLL        stages per main-loop iteration (even: the two shared stages alternate)
//   CONV_MMA           the float32 arithmetic of the main loop: 0 FP32 FFMA on the CUDA
//                      cores; 1 TF32 on the tensor cores (operands rounded to TF32, one
//                      mma.sync); 3 "3xTF32": each operand split into a TF32 big part and
//                      a TF32 small part, big*big + big*small + small*big, which recovers
//                      FP32-level accuracy. Tensor-core builds are float-only (double
//                      keeps the DFMA loop of the builds with CONV_MMA 0);
//   CONV_WM, CONV_WN   with CONV_MMA 1 or 3: rows, columns of a warp's tile (multiples of 32)
#if !defined(CONV_BM) || !defined(CONV_BN) || !defined(CONV_BK) || !defined(CONV_BK_DOUBLE) || \
    !defined(CONV_TM) || !defined(CONV_TN) || !defined(CONV_PAD) || !defined(CONV_UNROLL) || \
    !defined(CONV_MMA) || (CONV_MMA && (!defined(CONV_WM) || !defined(CONV_WN)))
#error "kernels/conv2d.cu takes its tile configuration as -D options: compile it through gpucnn/backends/cuda/conv.py (conv_options, compile_units)"
#endif
#if CONV_MMA
#include "tensor_core.cuh"
#endif

// cp.async: a copy from global to shared memory that runs in the background until
// cp_async_wait<N>() (all but the N newest committed groups have landed). sm_80+
// has the instruction (the 4- and 8-byte .ca form: the operands are gathered one
// element at a time; src-size 0 fills a masked element with zeros); below sm_80
// it is a plain copy. tests/emulator/cuda_emu.h brings its own versions, which
// land the data only at the wait, so that a missing wait reads poisoned memory.
#ifndef GPUCNN_EMULATOR
template <typename T>
__device__ __forceinline__ void cp_async(T* dst, const T* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned to = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(to), "l"(src),
                 "n"((int)sizeof(T)), "r"(valid ? (int)sizeof(T) : 0) : "memory");
#else
    *dst = valid ? *src : T(0);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif  // GPUCNN_EMULATOR

namespace conv {

constexpr int BM = CONV_BM, BN = CONV_BN, TM = CONV_TM, TN = CONV_TN;
// A stage holds BK reduction values, fewer for double: its 8x8 accumulators take
// twice the registers, and two stages must still fit in 48 KiB.
template <typename T>
struct Depth { static constexpr int value = sizeof(T) == 4 ? CONV_BK : CONV_BK_DOUBLE; };
constexpr int THREADS_M = BM / TM, THREADS_N = BN / TN, THREADS = THREADS_M * THREADS_N;
// A stage is stored k-major, As[k][m]; PAD elements of padding per row (4: the
// launcher's smem_bytes counts them) put the 8 k-rows a warp stores at once on
// different banks (row stride = 4 mod 32 words) and keep every row 16-byte aligned
// for the vector reads of the inner loop.
constexpr int PAD = CONV_PAD;
static_assert(PAD % 4 == 0, "rows must stay 16-byte aligned for the vector reads");
constexpr int LDA = BM + PAD, LDB = BN + PAD;
// How forward and backward-data read their gathered operand (x or dy through the
// filter window; see Operand): o-fast, a warp on 32 consecutive output pixels, except
// in a one-warp block, where o-fast would leave each thread all BK k of a stage with
// a cursor each to advance (8 for 32x32: 36% FFMA); k-fast leaves it one (47%).
constexpr bool GATHER_K_FAST = THREADS == 32;
// Blocks per SM the kernels are compiled for (__launch_bounds__): the one-warp float
// kernels are held to 128 registers, 16 blocks (25% occupancy), where ptxas would
// take up to 147 for backward-data (19%); the rest are left to ptxas (with 6 blocks
// of 64 threads, 168 registers, backward-filter 32x128 spills).
template <typename T>
struct MinBlocks { static constexpr int value = THREADS == 32 && sizeof(T) == 4 ? 16 : 1; };

constexpr int MMA = CONV_MMA;
static_assert(MMA == 0 || MMA == 1 || MMA == 3, "CONV_MMA must be 0, 1 or 3");
#if CONV_MMA
constexpr int WM = CONV_WM, WN = CONV_WN;
// A tensor-core thread holds the outputs of (WM/16) x (WN/8) m16n8 tiles, 4 each.
static_assert(WM % 32 == 0 && WN % 32 == 0 && BM % WM == 0 && BN % WN == 0 &&
                  TM == WM / 8 && TN == WN / 4 && THREADS == 32 * (BM / WM) * (BN / WN),
              "a tensor-core build needs TM = WM/8, TN = WN/4 and one warp per warp tile");
static_assert(CONV_BK % 8 == 0, "a tensor-core stage is whole k8 steps");
#endif
static_assert(CONV_UNROLL % 2 == 0 && CONV_UNROLL > 0, "CONV_UNROLL must be even");
static_assert(TM % 4 == 0 && TN % 4 == 0, "TM and TN must be multiples of 4");
static_assert(BM % TM == 0 && BN % TN == 0, "the block tile must split into thread tiles");
static_assert(THREADS % CONV_BK == 0 && THREADS % CONV_BK_DOUBLE == 0 && THREADS <= 1024,
              "threads must be a multiple of BK");
static_assert((BM <= THREADS ? THREADS % BM : BM % THREADS) == 0, "BM and the threads");
static_assert((BN <= THREADS ? THREADS % BN : BN % THREADS) == 0, "BN and the threads");
static_assert(BM * CONV_BK_DOUBLE % THREADS == 0 && BN * CONV_BK_DOUBLE % THREADS == 0,
              "whole loads per thread");

// An index i of a GEMM dimension, read as three digits (d0, d1, d2) with radices
// (-, r1, r2), addresses  base + d0*s0 + d1*s1 + d2*s2  and a window position
// (hbase + d1*h1, wbase + d2*w2) that must lie inside [0,H) x [0,W) to be read.
// Offsets are unsigned 32-bit and wrap: the launcher checks that every tensor has
// fewer than 2**31 elements, so the offset of any element that is actually read or
// written lies in [0, 2**31) and modular arithmetic gets it exactly, whatever the
// signs of the strides and base; a masked element's offset may be anything. Half the
// registers and instructions of 64-bit offsets in the per-element address code.
struct IndexMap {
    int r1, r2;
    unsigned s0, s1, s2, base;
    int h1, hbase, w2, wbase;
};

__device__ __forceinline__ IndexMap index_map(int r1, int r2, long long s0, long long s1,
                                              long long s2, long long base, int h1 = 0,
                                              int hbase = 0, int w2 = 0, int wbase = 0) {
    IndexMap m;
    m.r1 = r1; m.r2 = r2;
    m.s0 = (unsigned)s0; m.s1 = (unsigned)s1; m.s2 = (unsigned)s2; m.base = (unsigned)base;
    m.h1 = h1; m.hbase = hbase; m.w2 = w2; m.wbase = wbase;
    return m;
}

// A position along a map: its digits d1, d2, its offset and window position.
struct Cursor {
    int d1, d2, h, w;
    unsigned off;
};

// Divisions happen here, a few times per thread before the main loop, never in it.
// (Indices fit in 32 bits; the launcher checks.)
__device__ __forceinline__ Cursor locate(const IndexMap& m, int i) {
    // unsigned: every index and radix is >= 0, and unsigned division is shorter
    const unsigned q = (unsigned)i / (unsigned)m.r2, d0 = q / (unsigned)m.r1;
    Cursor c;
    c.d2 = (int)((unsigned)i - q * (unsigned)m.r2);
    c.d1 = (int)(q - d0 * (unsigned)m.r1);
    c.off = m.base + d0 * m.s0 + (unsigned)c.d1 * m.s1 + (unsigned)c.d2 * m.s2;
    c.h = m.hbase + c.d1 * m.h1;
    c.w = m.wbase + c.d2 * m.w2;
    return c;
}

// Adding a constant step to a cursor is a mixed-radix addition with at most one
// carry per digit: the step's digits and the carries' effects are precomputed.
struct Step {
    int q1, q2, dh, dw;
    unsigned doff;
    unsigned c2off, c1off;  // what a carry out of d2, d1 adds to the offset
    int c2w, c1h;           // and to the window position
};

__device__ __forceinline__ Step carries(Step s, const IndexMap& m) {
    s.c2off = m.s1 - (unsigned)m.r2 * m.s2; s.c1off = m.s0 - (unsigned)m.r1 * m.s1;
    s.c2w = -m.r2 * m.w2; s.c1h = -m.r1 * m.h1;
    return s;
}

__device__ __forceinline__ Step make_step(const IndexMap& m, int step) {
    const Cursor c = locate(index_map(m.r1, m.r2, m.s0, m.s1, m.s2, 0, m.h1, 0, m.w2, 0), step);
    Step s;
    s.q1 = c.d1; s.q2 = c.d2; s.dh = c.h; s.dw = c.w; s.doff = c.off;
    return carries(s, m);
}

// The step of one, without a division: (0, 1) is a valid step for every radix
// (with r2 == 1 the carry in advance turns it into (1, 0)).
__device__ __forceinline__ Step unit_step(const IndexMap& m) {
    Step s;
    s.q1 = 0; s.q2 = 1; s.dh = 0; s.dw = m.w2; s.doff = m.s2;
    return carries(s, m);
}

__device__ __forceinline__ void advance(Cursor& c, const IndexMap& m, const Step& s) {
    c.d2 += s.q2; c.d1 += s.q1; c.off += s.doff; c.h += s.dh; c.w += s.dw;
    if (c.d2 >= m.r2) { c.d2 -= m.r2; c.d1 += 1; c.off += s.c2off; c.h += m.h1; c.w += s.c2w; }
    if (c.d1 >= m.r1) { c.d1 -= m.r1; c.off += s.c1off; c.h += s.c1h; }
}

// One GEMM operand: O rows (A: BM, B: BN) by BK reduction values per stage,
// element (o, k) read at ptr[omap(o).off + kmap(k).off] when both are in range
// and, for a WINDOW operand (an image gathered through a filter window), the
// position omap(o).(h,w) + kmap(k).(h,w) lies inside [0,Hlim) x [0,Wlim); else a
// zero. Operands without a window are weights or dy rows: their omap is linear.
// The loader checks k and the window, never o: a row past the operand's end reads
// zeros (WINDOW: its window row is one no k reaches) or a copy of a row in range
// (not WINDOW; real elements, whose products land only in output rows or columns
// that are never stored). A masked element's address is still a real element's: the
// tensor's first (WINDOW) or its row's first (not WINDOW).
// K_FAST picks which index consecutive threads walk along: mostly the one along
// which the operand is contiguous in memory, so that a warp's loads coalesce
// (but see GATHER_K_FAST).
//   K_FAST:  k = t % BK,          o = t / BK + io * (THREADS / BK)
//   else:    o = t % 32 + 32*io,  k = t / 32 + ik * (THREADS / 32)
template <typename T, int O, bool K_FAST, bool WINDOW>
struct Operand {
    static constexpr int BK = Depth<T>::value;
    static constexpr int E = O * BK / THREADS;               // loads per thread per stage
    static constexpr int NO = K_FAST ? E : O / 32;           // distinct o per thread
    static constexpr int NK = E / NO;                        // distinct k per thread
    static constexpr int OSPACE = K_FAST ? THREADS / BK : 32;      // between a thread's o
    static constexpr int KSPACE = K_FAST ? BK : THREADS / 32;      // between a thread's k
    static_assert(K_FAST || (O % 32 == 0 && BK % (THREADS / 32) == 0), "o-fast layout");

    const T* ptr;
    IndexMap kmap;
    Step step;
    int Hlim, Wlim;
    unsigned ooff[NO];
    int oh[WINDOW ? NO : 1], ow[WINDOW ? NO : 1];
    Cursor k[NK];

    __device__ __forceinline__ static int o_first() {
        return K_FAST ? threadIdx.x / BK : threadIdx.x % 32;
    }
    __device__ __forceinline__ static int k_first() {
        return K_FAST ? threadIdx.x % BK : threadIdx.x / 32;
    }

    __device__ __forceinline__ void init(const T* p, const IndexMap& omap, int o0, int orows,
                                         const IndexMap& km, int k0, int hlim, int wlim) {
        ptr = p; kmap = km; Hlim = hlim; Wlim = wlim;
        step = make_step(km, BK);
        // the thread's o are evenly spaced: locate the first, step to the others
        const int oleft = orows - o0 - o_first();  // rows from the first o to the end
        Cursor o = locate(omap, oleft > 0 ? o0 + o_first() : 0);
        ooff[0] = o.off;
        if (WINDOW) {
            // a window row past every kmap(k).h: row + d1 * h1 < 0 for every d1 < r1
            const int past = -1 - (km.h1 > 0 ? (km.r1 - 1) * km.h1 : 0);
            const Step ostep = make_step(omap, OSPACE);
#pragma unroll
            for (int io = 0; io < (WINDOW ? NO : 1); ++io) {
                if (io) advance(o, omap, ostep);
                ooff[io] = o.off; oh[io] = io * OSPACE < oleft ? o.h : past; ow[io] = o.w;
            }
        } else {
            unsigned off = o.off;  // past the end, stays on a row in range
#pragma unroll
            for (int io = 1; io < NO; ++io) {
                if (io * OSPACE < oleft) off += OSPACE * omap.s0;
                ooff[io] = off;
            }
        }
        k[0] = locate(km, k0 + k_first());
        if (NK > 1) {
            const Step kstep = make_step(km, KSPACE);
#pragma unroll
            for (int ik = 1; ik < NK; ++ik) { k[ik] = k[ik - 1]; advance(k[ik], km, kstep); }
        }
    }

    // Copy this thread's elements of the stage whose first k is kleft before the
    // end into the shared stage s (As[k][o]); elements out of range become zeros.
    __device__ __forceinline__ void copy(T* s, int kleft) const {
        T* at = s + k_first() * (O + PAD) + o_first();
#pragma unroll
        for (int ik = 0; ik < NK; ++ik) {
            const bool kin = k_first() + ik * KSPACE < kleft;
            const unsigned koff = WINDOW || kin ? k[ik].off : 0u;
#pragma unroll
            for (int io = 0; io < NO; ++io) {
                bool in = kin;
                if (WINDOW) {
                    const int h = oh[io] + k[ik].h, w = ow[io] + k[ik].w;
                    in = in && (unsigned)h < (unsigned)Hlim && (unsigned)w < (unsigned)Wlim;
                }
                const unsigned off = ooff[io] + koff;
                cp_async(at + ik * KSPACE * (O + PAD) + io * OSPACE,
                         ptr + (WINDOW && !in ? 0u : off), in);
            }
        }
    }

    __device__ __forceinline__ void next() {
#pragma unroll
        for (int ik = 0; ik < NK; ++ik) advance(k[ik], kmap, step);
    }

};

__device__ __forceinline__ void load4(const float* p, float* v) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
}

__device__ __forceinline__ void load4(const double* p, double* v) {
    const double2 a = *reinterpret_cast<const double2*>(p);
    const double2 b = *reinterpret_cast<const double2*>(p + 2);
    v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}

#if !CONV_MMA
// Row i of a thread's TM rows: groups of 4 adjacent rows, THREADS_M*4 apart, so
// that a warp's stores of one group cover a contiguous run of the output.
__device__ __forceinline__ int thread_row(int i) {
    return (i / 4) * (4 * THREADS_M) + (threadIdx.x % THREADS_M) * 4 + i % 4;
}
__device__ __forceinline__ int thread_col(int j) {
    return (j / 4) * (4 * THREADS_N) + (threadIdx.x / THREADS_M) * 4 + j % 4;
}

// This thread's first A and B elements in shared stage 0, k row 0.
__device__ __forceinline__ int fragment_a() { return (threadIdx.x % THREADS_M) * 4; }
__device__ __forceinline__ int fragment_b() { return (threadIdx.x / THREADS_M) * 4; }

// acc += A(stage) * B(stage): the thread's TM x TN outer products, k by k.
template <typename T>
__device__ __forceinline__ void multiply_stage(const T* as, const T* bs, T (&acc)[TM][TN]) {
    constexpr int BK = Depth<T>::value;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        T ra[TM], rb[TN];
#pragma unroll
        for (int i = 0; i < TM; i += 4) load4(as + kk * LDA + i * THREADS_M, ra + i);
#pragma unroll
        for (int j = 0; j < TN; j += 4) load4(bs + kk * LDB + j * THREADS_N, rb + j);
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] += ra[i] * rb[j];
    }
}
#else
// Tensor cores: warp w computes the WM x WN warp tile (w % (BM/WM), w / (BM/WM)) as
// MI x NI m16n8k8 MMAs per k8 step. Which tile row an MMA row stands for (and which
// tile column an MMA column) is ours to choose, as long as A, B and the store agree:
// MMA tile mi's row g + 8h (tensor_core.cuh: g = lane/4, t = lane%4) is tile row
//   (mi/2)*32 + g*4 + (mi%2)*2 + h,   and MMA tile ni's column c is (ni/4)*32 + c*4 + ni%4.
// Then a lane's A values at one k are runs of 4 adjacent rows and its B values runs
// of 4 adjacent columns (float4 reads, on distinct banks with rows 8 mod 32 words
// apart: PAD 8), and it holds the outputs of rows (i/4)*32 + g*4 + i%4, i < TM,
// and columns (j/8)*32 + t*8 + j%8, j < TN: runs of 4 rows, as the store expects.
constexpr int MI = WM / 16, NI = WN / 8, WARPS_M = BM / WM;
static_assert(PAD % 32 == 8, "tensor-core stages need rows 8 mod 32 words apart (PAD)");

__device__ __forceinline__ int lane() { return threadIdx.x % 32; }
__device__ __forceinline__ int thread_row(int i) {
    return (threadIdx.x / 32 % WARPS_M) * WM + (i / 4) * 32 + (lane() / 4) * 4 + i % 4;
}
__device__ __forceinline__ int thread_col(int j) {
    return (threadIdx.x / 32 / WARPS_M) * WN + (j / 8) * 32 + (lane() % 4) * 8 + j % 8;
}
// This lane's first A and B elements in shared stage 0: k row t, its runs of 4.
__device__ __forceinline__ int fragment_a() {
    return (lane() % 4) * LDA + (threadIdx.x / 32 % WARPS_M) * WM + (lane() / 4) * 4;
}
__device__ __forceinline__ int fragment_b() {
    return (lane() % 4) * LDB + (threadIdx.x / 32 / WARPS_M) * WN + (lane() / 4) * 4;
}

// v as TF32 (big); with 3xTF32 also the TF32 rounding of what big leaves out
// (small): v - big is exact in float, and big + small carries about 21 bits of v.
__device__ __forceinline__ void split_tf32(float v, unsigned& big, unsigned& small) {
    big = tc::tf32_rna(v);
    small = MMA == 3 ? tc::tf32_rna(v - __int_as_float((int)big)) : 0u;
}

// acc += A(stage) * B(stage) on the tensor cores, k8 step by k8 step. With 3xTF32
// the small products go first, so that they are not lost against the big one.
__device__ __forceinline__ void multiply_stage(const float* as, const float* bs,
                                               float (&acc)[TM][TN]) {
#pragma unroll
    for (int k8 = 0; k8 < CONV_BK; k8 += 8) {
        unsigned ab[2][TM], as_[2][TM], bb[2][NI], bsm[2][NI];
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // k rows t and t + 4 of the step
            float v[TM > NI ? TM : NI];
#pragma unroll
            for (int i = 0; i < TM; i += 4) load4(as + (k8 + 4 * h) * LDA + (i / 4) * 32, v + i);
#pragma unroll
            for (int i = 0; i < TM; ++i) split_tf32(v[i], ab[h][i], as_[h][i]);
#pragma unroll
            for (int n = 0; n < NI; n += 4) load4(bs + (k8 + 4 * h) * LDB + (n / 4) * 32, v + n);
#pragma unroll
            for (int n = 0; n < NI; ++n) split_tf32(v[n], bb[h][n], bsm[h][n]);
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            const int i0 = (mi / 2) * 4 + (mi % 2) * 2;  // the lane's rows g and g + 8
            const unsigned a[4] = {ab[0][i0], ab[0][i0 + 1], ab[1][i0], ab[1][i0 + 1]};
            const unsigned a_small[4] = {as_[0][i0], as_[0][i0 + 1], as_[1][i0], as_[1][i0 + 1]};
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const int j0 = (ni / 4) * 8 + ni % 4;  // the lane's columns 2t and 2t + 1
                const unsigned b[2] = {bb[0][ni], bb[1][ni]};
                const unsigned b_small[2] = {bsm[0][ni], bsm[1][ni]};
                float d[4] = {acc[i0][j0], acc[i0][j0 + 4], acc[i0 + 1][j0], acc[i0 + 1][j0 + 4]};
                if (MMA == 3) {
                    tc::mma_tf32(d, a_small, b, d);
                    tc::mma_tf32(d, a, b_small, d);
                }
                tc::mma_tf32(d, a, b, d);
                acc[i0][j0] = d[0]; acc[i0][j0 + 4] = d[1];
                acc[i0 + 1][j0] = d[2]; acc[i0 + 1][j0 + 4] = d[3];
            }
        }
    }
}
#endif

// One stage of the main loop, CUR being the shared-memory stage it multiplies
// (kleft reduction values left from its first): the operands' cursors point at
// the next stage, whose copies into the other shared stage are issued first and
// land while this stage's products run. The other stage was last read in the
// previous stage, before the barrier that ended it, so it can be overwritten now.
// A stage with compute false only copies: the main loop's first, which loads
// stage 0 (one copy of the loader code in the kernel, not a second before the loop).
// af, bf: this thread's first fragment in shared stage 0 of A and B.
template <int CUR, typename T, typename OpA, typename OpB>
__device__ __forceinline__ void stage(OpA& a, OpB& b, T* As, T* Bs, const T* af, const T* bf,
                                      int kleft, bool compute, T (&acc)[TM][TN]) {
    constexpr int BK = Depth<T>::value;
    if (kleft > BK) {
        a.copy(As + (1 - CUR) * BK * LDA, kleft - BK);
        b.copy(Bs + (1 - CUR) * BK * LDB, kleft - BK);
        a.next();
        b.next();
    }
    cp_async_commit();
    if (compute) multiply_stage(af + CUR * BK * LDA, bf + CUR * BK * LDB, acc);
    cp_async_wait<0>();  // this thread's copies of the next stage have landed...
    __syncthreads();     // ...and everyone's
}

// The main loop: acc[i][j] = sum over the klen reduction values, in increasing
// order, of A(row i, k) * B(k, col j), BK at a time, through two shared stages.
// It starts one stage early, at a stage -1 (shared stage 1, klen + BK values left)
// that only copies stage 0 into shared stage 0.
template <typename T, typename OpA, typename OpB>
__device__ __forceinline__ void gemm_tile(OpA& a, OpB& b,
                                          int klen, T (&acc)[TM][TN], unsigned char* smem) {
    constexpr int BK = Depth<T>::value;
    T* As = reinterpret_cast<T*>(smem);  // [2][BK][LDA]
    T* Bs = As + 2 * BK * LDA;           // [2][BK][LDB]
    const T* af = As + fragment_a();  // computed once, not per stage
    const T* bf = Bs + fragment_b();
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    if (klen <= 0) return;
    // CONV_UNROLL stages per iteration, so that the shared stage index is a constant
    for (int kleft = klen + BK; kleft > 0; kleft -= CONV_UNROLL * BK) {
#pragma unroll
        for (int u = 0; u < CONV_UNROLL; u += 2) {
            if (kleft > u * BK)
                stage<1, T>(a, b, As, Bs, af, bf, kleft - u * BK, u > 0 || kleft <= klen, acc);
            if (kleft > (u + 1) * BK)
                stage<0, T>(a, b, As, Bs, af, bf, kleft - (u + 1) * BK, true, acc);
        }
    }
}

// Four adjacent outputs in one 16-byte store; p must be 16-byte aligned (the
// emulator checks it: the GPU faults on a misaligned vector store).
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
#ifdef GPUCNN_EMULATOR
    if (!emu::check_aligned(p, 16, "store4")) return;
#endif
    float4 v;
    v.x = a; v.y = b; v.z = c; v.w = d;
    *reinterpret_cast<float4*>(p) = v;
}
__device__ __forceinline__ void store4(double* p, double a, double b, double c, double d) {
#ifdef GPUCNN_EMULATOR
    if (!emu::check_aligned(p, 16, "store4")) return;
#endif
    double2 u, v;
    u.x = a; u.y = b; v.x = c; v.y = d;
    reinterpret_cast<double2*>(p)[0] = u;
    reinterpret_cast<double2*>(p)[1] = v;
}

// An output with its bias; for a pass without bias, acc itself (acc + 0 would turn
// -0 into +0).
template <bool HAS_BIAS, typename T>
__device__ __forceinline__ T biased(T acc, T bias) { return HAS_BIAS ? acc + bias : acc; }

// out[rows(m).off + col_base + n*col_stride] = acc (+ bias[n], 0 if null) for the thread's
// in-range outputs. A thread's rows come in runs of 4 adjacent ones: the first of a
// run is located, the next three are one step further each. Its columns come in
// runs of 4 too (n % 4 == 0 at a run's first): with COLUMN_RUNS, where every run is 4
// adjacent outputs in memory, 16 bytes aligned (backward-filter's partial sums with
// C/groups*R*S a multiple of 4), one vector store writes a run. Only backward-filter
// asks for it: split-K stores its outputs once per slice, and the other passes'
// extra store path would cost their one-warp kernels spills or their FFMA share
// (docs/benchmarks.md). The test is the same for the whole block: no divergence.
template <bool COLUMN_RUNS, bool HAS_BIAS, typename T>
__device__ __forceinline__ void store_tile(T* out, const T (&acc)[TM][TN], const IndexMap& rows,
                                           int m0, int M, long long col_base, int col_stride,
                                           int n0, int Ncols, const T* bias) {
    // a 32-bit offset per column, added to the row's (a stored element's offset lies
    // in [0, 2**31), so the 32-bit sum is exact)
    unsigned col[TN];
    T b[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
        const int n = n0 + thread_col(j);
        col[j] = (unsigned)(col_base + (long long)n * col_stride);
        b[j] = HAS_BIAS && bias != nullptr && n < Ncols ? bias[n] : T(0);
    }
    const bool runs = COLUMN_RUNS && col_stride == 1 && Ncols % 4 == 0 && col_base % 4 == 0 &&
        rows.base % 4 == 0 && rows.s0 % 4 == 0 && rows.s1 % 4 == 0 && rows.s2 % 4 == 0;
    const Step one = unit_step(rows);
    Cursor r;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + thread_row(i);
        if (m >= M) break;  // rows only grow with i
        if (i % 4 == 0) r = locate(rows, m);
        else advance(r, rows, one);
        if (runs) {
#pragma unroll
            for (int j = 0; j < TN; j += 4)
                if (n0 + thread_col(j) < Ncols)  // then the run's other 3 are too
                    store4(out + r.off + col[j], biased<HAS_BIAS>(acc[i][j], b[j]),
                           biased<HAS_BIAS>(acc[i][j + 1], b[j + 1]),
                           biased<HAS_BIAS>(acc[i][j + 2], b[j + 2]),
                           biased<HAS_BIAS>(acc[i][j + 3], b[j + 3]));
        } else {
#pragma unroll
            for (int j = 0; j < TN; ++j)
                if (n0 + thread_col(j) < Ncols)
                    out[r.off + col[j]] = biased<HAS_BIAS>(acc[i][j], b[j]);
        }
    }
}

}  // namespace conv

// The kernels take the convolution's geometry as ints (every index and count
// fits in 32 bits; offsets are 64-bit). pt/pl are the top/left padding; the
// bottom/right padding needs no argument: positions past the input read zeros.

// y[n,k,p,q] = bias[k] + sum_{c',r,s} x[n, g*Cg + c', p*sh - pt + r*dh, q*sw - pl + s*dw]
//                                     * w[k, c', r, s],   k in group g = blockIdx.z.
// GEMM rows (n,p,q), columns k of the group, reduction (c',r,s); bias in the epilogue.
// Grid (ceil(N*P*Q/BM), ceil(K/groups/BN), groups), conv::THREADS threads.
template <typename T>
__global__ void __launch_bounds__(conv::THREADS, conv::MinBlocks<T>::value)
conv2d_forward(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
               T* __restrict__ y, int N, int C, int H, int W, int K, int R, int S, int P, int Q,
               int sh, int sw, int pt, int pl, int dh, int dw, int groups, int has_bias) {
    using namespace conv;
    extern __shared__ unsigned char smem[];  // 2 stages of A and B (backends/cuda/conv.py: smem_bytes)
    const int g = blockIdx.z, Cg = C / groups, Kg = K / groups, RS = R * S, Jg = Cg * RS;
    const int PQ = P * Q, M = N * PQ, m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const long long HW = (long long)H * W;
    if (m0 >= M) return;
    Operand<T, BM, GATHER_K_FAST, true> a;  // x gathered (o-fast: consecutive threads, q)
    a.init(x, index_map(P, Q, C * HW, (long long)sh * W, sw, g * Cg * HW - (long long)pt * W - pl,
                        sh, -pt, sw, -pl),
           m0, M, index_map(R, S, HW, (long long)dh * W, dw, 0, dh, 0, dw, 0), 0, H, W);
    Operand<T, BN, true, false> b;   // w as a (K, Jg) matrix, read along its rows
    b.init(w, index_map(1, 1, Jg, 0, 0, (long long)g * Kg * Jg), n0, Kg,
           index_map(R, S, RS, S, 1, 0), 0, 1, 1);
    T acc[TM][TN];
    gemm_tile(a, b, Jg, acc, smem);
    const IndexMap rows = index_map(1, PQ, (long long)K * PQ, 0, 1, 0);  // (n, pq)
    store_tile<false, true>(y, acc, rows, m0, M, (long long)g * Kg * PQ, PQ, n0, Kg,
               has_bias ? bias + g * Kg : (const T*)nullptr);
}

// dx[n,c,h,w] = sum over k of c's group and the taps (r,s) that reach (h,w) of
// dy[n,k,(h+pt-r*dh)/sh,(w+pl-s*dw)/sw] * w[k,c',r,s]. Split into stride phases:
// phase (ph,pw) holds the pixels with (h+pt) mod sh == ph and (w+pl) mod sw == pw,
// whose taps are exactly the r with r*dh = ph (mod sh): an arithmetic progression
// r0, r0+rstep, ... along which the dy row moves by -dph. So every tap of the
// reduction lands on a real dy element (no multiplication by an inserted zero).
// GEMM per (group, phase) = blockIdx.z: rows (n,ih,iw) with h = h1st + ih*sh,
// columns c', reduction (k, tap row, tap column).
// phase_table[phase] holds the phase's PHASE_FIELDS ints, computed by the launcher
// (gpucnn/backends/cuda/conv.py: dgrad_phases): h1st w1st Hph Wph r0 s0 rstep sstep nr ns offh
// offw dph dpw, where p = ih + offh - i*dph for the i-th tap row (likewise q).
// Grid (ceil(N*ceil(H/sh)*ceil(W/sw)/BM), ceil(C/groups/BN), groups*sh*sw).
template <typename T>
__global__ void __launch_bounds__(conv::THREADS, conv::MinBlocks<T>::value)
conv2d_backward_data(const T* __restrict__ dy, const T* __restrict__ w, T* __restrict__ dx,
                     const int* __restrict__ phase_table, int N, int C, int H, int W, int K,
                     int R, int S, int P, int Q, int sh, int sw, int pt, int pl, int dh, int dw,
                     int groups) {
    using namespace conv;
    extern __shared__ unsigned char smem[];  // 2 stages of A and B (backends/cuda/conv.py: smem_bytes)
    const int phases = sh * sw, g = blockIdx.z / phases;
    const int* ph = phase_table + (blockIdx.z - g * phases) * 14;
    const int h1st = ph[0], w1st = ph[1], Hph = ph[2], Wph = ph[3], r0 = ph[4], s0 = ph[5];
    const int rstep = ph[6], sstep = ph[7], nr = ph[8], ns = ph[9], offh = ph[10];
    const int offw = ph[11], dph = ph[12], dpw = ph[13];
    const int Cg = C / groups, Kg = K / groups, RS = R * S, PQ = P * Q;
    const long long HW = (long long)H * W;
    const int M = N * Hph * Wph, m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    if (m0 >= M) return;
    const int klen = Kg * nr * ns;
    Operand<T, BM, GATHER_K_FAST, true> a;  // dy gathered (o-fast: consecutive threads, iw)
    Operand<T, BN, true, false> b;   // w, read along the phase's taps
    if (klen > 0) {
        a.init(dy, index_map(Hph, Wph, (long long)K * PQ, Q, 1,
                             (long long)g * Kg * PQ + (long long)offh * Q + offw, 1, offh, 1, offw),
               m0, M, index_map(nr, ns, PQ, -(long long)dph * Q, -dpw, 0, -dph, 0, -dpw, 0),
               0, P, Q);
        b.init(w, index_map(1, 1, RS, 0, 0, (long long)g * Kg * Cg * RS + r0 * S + s0), n0, Cg,
               index_map(nr, ns, (long long)Cg * RS, (long long)rstep * S, sstep, 0), 0, 1, 1);
    }
    T acc[TM][TN];
    gemm_tile(a, b, klen, acc, smem);  // klen == 0 (no tap reaches this phase): zeros
    store_tile<false, false>(dx, acc, index_map(Hph, Wph, C * HW, (long long)sh * W, sw,
                                         (long long)h1st * W + w1st),
                      m0, M, g * Cg * HW, (int)HW, n0, Cg, (const T*)nullptr);
}

// dw[k,c',r,s] = sum over (n,p,q) of
//               dy[n,k,p,q] * x[n, g*Cg + c', p*sh - pt + r*dh, q*sw - pl + s*dw].
// GEMM rows k of the group, columns (c',r,s), reduction (n,p,q) split into
// `slices` consecutive ranges of slice_len (a multiple of BK):
// blockIdx.z = g * slices + slice writes partial[slice] (K, Cg*R*S); with one
// slice, partial is dw itself; else conv2d_sum_slices adds the slices in order.
// (partial too has fewer than 2**31 elements, as the 32-bit offsets need: where
// filter_slices splits, its grid is under 14 waves (the first plan 7/8 full is
// taken), and a wave's blocks hold at most 2**22 outputs: under 2**26 in all.)
// Grid (ceil(K/groups/BM), ceil(Cg*R*S/BN), groups*slices).
template <typename T>
__global__ void __launch_bounds__(conv::THREADS, conv::MinBlocks<T>::value)
conv2d_backward_filter(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ partial,
                       int N, int C, int H, int W, int K, int R, int S, int P, int Q, int sh,
                       int sw, int pt, int pl, int dh, int dw, int groups, int slices,
                       int slice_len) {
    using namespace conv;
    extern __shared__ unsigned char smem[];  // 2 stages of A and B (backends/cuda/conv.py: smem_bytes)
    const int g = blockIdx.z / slices, slice = blockIdx.z % slices;
    const int Cg = C / groups, Kg = K / groups, RS = R * S, Jg = Cg * RS, PQ = P * Q;
    const int NPQ = N * PQ, m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, k0 = slice * slice_len;
    const int klen = NPQ - k0 < slice_len ? NPQ - k0 : slice_len;
    const long long HW = (long long)H * W;
    Operand<T, BM, true, false> a;  // dy rows k, read along (n,p,q)
    a.init(dy, index_map(1, 1, PQ, 0, 0, (long long)g * Kg * PQ), m0, Kg,
           index_map(P, Q, (long long)K * PQ, Q, 1, 0), k0, 1, 1);
    Operand<T, BN, true, true> b;  // x gathered, read along (n,p,q)
    b.init(x, index_map(R, S, HW, (long long)dh * W, dw, g * Cg * HW - (long long)pt * W - pl,
                        dh, -pt, dw, -pl),
           n0, Jg, index_map(P, Q, C * HW, (long long)sh * W, sw, 0, sh, 0, sw, 0), k0, H, W);
    T acc[TM][TN];
    gemm_tile(a, b, klen, acc, smem);
    const long long out0 = ((long long)slice * K + g * Kg) * Jg;
    store_tile<true, false>(partial, acc, index_map(1, 1, Jg, 0, 0, out0), m0,
               Kg, 0, 1, n0, Jg, (const T*)nullptr);
}
