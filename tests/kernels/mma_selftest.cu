// The TF32 tensor-core instructions of kernels/tensor_core.cuh in small kernels,
// for tests/kernels/test_tensor_core_emulated.py: run on the CPU by the emulator
// and compiled by NVRTC. Each PLANT_* option (-D) plants one fault that the test
// shows caught:
//   PLANT_SWAPPED_A     gemm_tf32 loads a1 and a2 from each other's places
//   PLANT_NO_SYNCWARP   gemm_tf32 reads its warp's A slice without __syncwarp
//   PLANT_UNROUNDED     gemm_tf32 hands the MMA raw float bits, no cvt.rna
//   PLANT_PARTIAL_WARP  lane 5 of every warp skips the mma
#include "tensor_core.cuh"

// cvt.rna.tf32.f32 of every element.
__global__ void round_tf32(const float* x, unsigned* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = tc::tf32_rna(x[i]);
}

// One mma per warp on fragments laid out by the caller: thread i holds
// a[4i..4i+3], b[2i..2i+1], c[4i..4i+3] and leaves its d in d[4i..4i+3].
__global__ void mma_fragments(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned fa[4] = {a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]};
    const unsigned fb[2] = {b[2 * i], b[2 * i + 1]};
    const float fc[4] = {c[4 * i], c[4 * i + 1], c[4 * i + 2], c[4 * i + 3]};
    float fd[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#ifdef PLANT_PARTIAL_WARP
    if (threadIdx.x % 32 != 5)
#endif
        tc::mma_tf32(fd, fa, fb, fc);
    for (int j = 0; j < 4; ++j) d[4 * i + j] = fd[j];
}

#ifdef PLANT_UNROUNDED
#define OPERAND(x) __float_as_uint(x)
#else
#define OPERAND(x) tc::tf32_rna(x)
#endif

// C (M x N) = A (M x K) B (K x N), row-major, with M, N and K multiples of 32, 16
// and 8. A block of 128 threads computes 32 x 16 of C, each of its 4 warps one
// 16 x 8 tile with one mma per 8 steps of k. A warp stages its 16 x 8 slice of A
// through shared memory of its own, each lane copying 4 elements that are not the
// ones its fragment holds, so the lanes exchange data and need __syncwarp; the
// block stages its 8 x 16 slice of B together (__syncthreads).
__global__ void gemm_tf32(const float* A, const float* B, float* C, int M, int N, int K) {
    __shared__ float a_stage[4 * 16 * 8];
    __shared__ float b_stage[8 * 16];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int row0 = blockIdx.y * 32 + (warp / 2) * 16;  // the warp's tile in C
    const int col0 = blockIdx.x * 16 + (warp % 2) * 8;
    float* as = a_stage + warp * 16 * 8;
    const float* bs = b_stage + (warp % 2) * 8;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += 8) {
        for (int j = 0; j < 4; ++j) {
            const int e = lane * 4 + j;
            as[e] = A[(row0 + e / 8) * K + k0 + e % 8];
        }
#ifndef PLANT_NO_SYNCWARP
        __syncwarp();
#endif
        unsigned a[4];
        a[0] = OPERAND(as[g * 8 + t]);
#ifdef PLANT_SWAPPED_A
        a[2] = OPERAND(as[(g + 8) * 8 + t]);
        a[1] = OPERAND(as[g * 8 + t + 4]);
#else
        a[1] = OPERAND(as[(g + 8) * 8 + t]);
        a[2] = OPERAND(as[g * 8 + t + 4]);
#endif
        a[3] = OPERAND(as[(g + 8) * 8 + t + 4]);
        b_stage[threadIdx.x] = B[(k0 + threadIdx.x / 16) * N + blockIdx.x * 16 + threadIdx.x % 16];
        __syncthreads();
        const unsigned b[2] = {OPERAND(bs[t * 16 + g]), OPERAND(bs[(t + 4) * 16 + g])};
#ifdef PLANT_PARTIAL_WARP
        if (lane != 5)
#endif
            tc::mma_tf32(acc, a, b, acc);
        __syncthreads();  // before the next step overwrites both stages
    }
    C[(row0 + g) * N + col0 + 2 * t] = acc[0];
    C[(row0 + g) * N + col0 + 2 * t + 1] = acc[1];
    C[(row0 + g + 8) * N + col0 + 2 * t] = acc[2];
    C[(row0 + g + 8) * N + col0 + 2 * t + 1] = acc[3];
}
