// The tensor-core instructions the convolution kernels use, one small device
// function per PTX instruction. On a GPU each is the instruction itself (inline
// PTX, sm_80 and later); under the emulator (tests/emulator/cuda_emu.h, where
// GPUCNN_EMULATOR is defined) each calls the emulator's implementation of the
// same instruction, which follows what the PTX ISA documents for it: the
// rounding of cvt.rna.tf32.f32, and for mma.sync which lane holds which element
// of the A, B, C and D fragments. A kernel that assumes another layout gets
// wrong numbers on the CPU as on the GPU.
//
// The loader (gpucnn/backends/cuda/loader.py) pastes this file in place of its
// #include line, so NVRTC, nvcc and the emulator compile one self-contained text.

namespace tc {

// cvt.rna.tf32.f32: x rounded to TF32 (10 explicit mantissa bits), to nearest
// with ties away from zero; returned as the 32-bit pattern the MMA reads.
__device__ __forceinline__ unsigned tf32_rna(float x) {
#if defined(GPUCNN_EMULATOR)
    return emu::cvt_rna_tf32(x);
#elif __CUDA_ARCH__ >= 800
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
#else
    __trap();  // no TF32 before sm_80: the launcher never selects these kernels there
    return 0u;
#endif
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: D (16x8) = A (16x8) * B (8x8)
// + C, a warp-collective: all 32 lanes of the warp execute it together. With
// g = lane / 4 and t = lane % 4, the PTX ISA's fragment layouts are
//   A: a[0] = A[g][t]   a[1] = A[g+8][t]   a[2] = A[g][t+4]   a[3] = A[g+8][t+4]
//   B: b[0] = B[t][g]   b[1] = B[t+4][g]
//   C, D: c[0] = C[g][2t]  c[1] = C[g][2t+1]  c[2] = C[g+8][2t]  c[3] = C[g+8][2t+1]
// A and B hold TF32 patterns (tf32_rna); d may be c.
// (Under the emulator a trailing argument, left to its default, names the caller's
// line: lanes of one warp at different MMAs are then refused, as on a GPU they hang.)
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4],
                                         const unsigned (&b)[2], const float (&c)[4]
#if defined(GPUCNN_EMULATOR)
                                         , emu::Site site = emu::Site()
#endif
                                         ) {
#if defined(GPUCNN_EMULATOR)
    emu::mma_m16n8k8_tf32(d, a, b, c, site);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
    __trap();
#endif
}

}  // namespace tc
