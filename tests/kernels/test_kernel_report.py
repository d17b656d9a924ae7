"""The static report (gpucnn info --kernels): every kernel compiled for sm_90,
its resources read from ptxas and its SASS, without a GPU. No kernel spills."""
import glob
import os
import shutil
import subprocess

import pytest

from gpucnn.app import cli
from gpucnn.backends import cuda
from gpucnn.backends.cuda import conv as cuda_conv
from gpucnn.backends.cuda.loader import CompileUnit
from gpucnn.tools import kernel_report as kr, nvrtc

needs_nvrtc = pytest.mark.skipif(nvrtc.library() is None,
                                 reason="NVRTC is not installed (pip install "
                                        "nvidia-cuda-nvrtc-cu12; CI installs it)")


@pytest.fixture(scope="module")
def kernels():
    return [k for unit in cuda.compile_units() for k in kr.analyse(unit)]


@needs_nvrtc
def test_every_kernel_is_reported_with_real_numbers(kernels):
    names = [(u.config, n) for u in cuda.compile_units() for n in u.name_expressions]
    assert [(k.config, k.name) for k in kernels] == names
    for k in kernels:
        assert 16 <= k.registers <= 255, k
        assert k.threads and 0 < k.occupancy <= 1 and k.limiter, k
        assert k.static_shared >= 0 and k.dynamic_shared >= 0


@needs_nvrtc
def test_no_kernel_spills_or_uses_local_memory(kernels):
    local = [(k.config, k.name, k.stack, k.spill_stores, k.spill_loads) for k in kernels
             if k.stack or k.spill_stores or k.spill_loads]
    assert not local, f"local memory (stack frame, spill stores, spill loads) in: {local}"


@needs_nvrtc
def test_the_sass_is_read(kernels):
    found = kr.tools()
    assert found["cuobjdump"] or found["nvdisasm"], kr.missing_tools_note(found)
    for k in kernels:
        assert k.instructions > 50 and 0 <= k.fmas < k.instructions, k
        tensor_core = k.config.endswith(("tf32", "3xtf32"))
        assert k.fma_op == ("HMMA" if tensor_core else "DFMA" if "double" in k.name else "FFMA")
    # the convolutions multiply-add in loops, and the report finds them
    looping = [k for k in kernels if k.name.startswith("conv2d") and k.loop_fmas]
    assert looping
    for k in looping:
        assert 0 < k.loop_fmas <= k.fmas and k.loop_fmas <= k.loop_instructions < k.instructions


# Every convolution main kernel's float SASS is at least 45% FFMA, the one-warp
# 32x32 tile included: the main loops stay multiply-add bound (docs/benchmarks.md
# has the numbers).
FFMA_TARGET = 0.45
CONV_MAIN = ("conv2d_forward<float>", "conv2d_backward_data<float>",
             "conv2d_backward_filter<float>")


@needs_nvrtc
def test_conv_main_kernels_are_at_least_45_percent_ffma(kernels):
    found = kr.tools()
    if not (found["cuobjdump"] or found["nvdisasm"]):
        pytest.skip(kr.missing_tools_note(found))
    main = [k for k in kernels if k.name in CONV_MAIN and k.config in cuda_conv.CONV_CONFIGS]
    assert sorted((k.config, k.name) for k in main) == \
        sorted((c, n) for c in cuda_conv.CONV_CONFIGS for n in CONV_MAIN)
    shares = {(k.config, k.name): k.fmas / k.instructions for k in main}
    below = {key: f"{share:.1%}" for key, share in shares.items() if share < FFMA_TARGET}
    assert not below, below


@needs_nvrtc
@pytest.mark.parametrize("precision", ["tf32", "3xtf32"])
def test_tensor_core_main_kernels_meet_their_targets(kernels, precision):
    """Every tensor-core build's main kernels: HMMA in the main loop (3 per MMA step
    for 3xtf32), no local memory (above), and at least 8 resident warps per SM."""
    found = kr.tools()
    if not (found["cuobjdump"] or found["nvdisasm"]):
        pytest.skip(kr.missing_tools_note(found))
    main = {(k.config, k.name): k for k in kernels if k.name in CONV_MAIN
            and k.config.endswith(" " + precision)}
    assert sorted(main) == sorted((cuda_conv.build_label(c, precision), n)
                                  for c in cuda_conv.CONV_CONFIGS for n in CONV_MAIN)
    for key, k in main.items():
        assert k.fma_op == "HMMA" and k.loop_fmas > 0 and k.loop_fmas % 16 == 0, key
        assert k.occupancy * kr.SM90.max_warps >= 8, (key, k.occupancy)
        wm, wn = cuda_conv.WARP_TILES[key[0].split()[0]]  # a warp's MMAs per k8 step:
        per_step = wm // 16 * (wn // 8) * (3 if precision == "3xtf32" else 1)
        assert k.loop_fmas % per_step == 0, (key, k.loop_fmas, per_step)  # whole steps only


@needs_nvrtc
def test_split_k_plans_with_each_builds_resident_blocks(kernels):
    """The launcher's RESIDENT_BLOCKS, with which split-K sizes its waves, is what the
    compiled backward-filter kernels of each build fit on an sm_90 SM."""
    found = {(k.config, k.name): k for k in kernels if k.name.startswith("conv2d_backward_filter")}
    for config in cuda_conv.CONV_CONFIGS:
        for precision, dtype in [("fp32", "float"), ("tf32", "float"), ("3xtf32", "float"),
                                 ("fp32", "double")]:
            k = found[(cuda_conv.build_label(config, precision),
                       f"conv2d_backward_filter<{dtype}>")]
            blocks = round(k.occupancy * kr.SM90.max_warps * kr.SM90.warp_size / k.threads)
            itemsize = 8 if dtype == "double" else 4
            assert cuda_conv.resident_blocks(config, precision, itemsize) == blocks, (
                config, precision, dtype, k.registers)


@needs_nvrtc
def test_both_disassemblers_agree():
    found = kr.tools()
    if not (found["cuobjdump"] and found["nvdisasm"]):
        pytest.skip("needs both cuobjdump and nvdisasm")
    unit = cuda.compile_units()[0]
    assert kr.analyse(unit, found) == kr.analyse(unit, dict(found, nvdisasm=None)) == \
        kr.analyse(unit, dict(found, cuobjdump=None))


SPILLER = r"""
template <typename T>
__global__ void spiller(const T* x, T* y, int n) {
    T v[64];
    for (int i = 0; i < 64; ++i) v[i] = x[threadIdx.x + i * n];
    T acc = 0;
    for (int j = 0; j < 64; ++j)
        for (int i = 0; i < 64; ++i) acc += v[i] * v[(i + j) & 63];
    y[threadIdx.x] = acc;
}
"""


@needs_nvrtc
def test_a_planted_spill_is_reported():
    unit = CompileUnit("spiller.cu", "regs24", ("--maxrregcount=24",), ["spiller<float>"],
                            {"spiller": 128})
    (k,) = kr.analyse(unit, code=SPILLER)
    assert k.registers <= 24 and k.spill_stores > 0 and k.spill_loads > 0


@needs_nvrtc
def test_the_command(capsys):
    assert cli.main(["info", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "sm_90" in out and "conv2d_backward_data<float>" in out and "max_pool2d" in out
    assert "local memory (spills or stack) in" not in out


def test_a_kernel_that_does_not_compile_fails_with_its_log():
    if nvrtc.library() is None:
        pytest.skip("NVRTC is not installed")
    unit = CompileUnit("bad.cu", "default", (), ["k<float>"], {"k": 32})
    with pytest.raises(RuntimeError, match="identifier \"b\" is undefined"):
        kr.analyse(unit, code="template <typename T> __global__ void k(T* a) { a[0] = b; }")


# ---- the parts, on fixed inputs (no NVRTC needed) -----------------------------------
@pytest.mark.parametrize("registers, shared, threads, expected, limiter", [
    (32, 0, 256, 1.0, "warps"),
    (48, 0, 256, 0.625, "registers"),       # 1536 registers a warp: 10 warps per sub-partition
    (64, 0, 256, 0.5, "registers"),
    (255, 0, 128, 0.125, "registers"),      # 8192 a warp (rounded to 256): 2 per sub-partition
    (32, 100 * 1024, 256, 0.25, "shared memory"),  # 101 KiB a block with the reserved 1 KiB
    (32, 0, 1024, 1.0, "warps"),
    (32, 0, 32, 0.5, "blocks"),             # at most 32 blocks of one warp
    (32, 228 * 1024, 64, 0.0, "shared memory"),  # over 227 KiB: does not launch
])
def test_occupancy_follows_the_calculator(registers, shared, threads, expected, limiter):
    assert kr.occupancy(registers, shared, threads) == (expected, limiter)


OCCUPANCY_H = r"""
#include <cstdio>
#include "cuda_occupancy.h"
// An H100 (sm_90) as cudaGetDeviceProperties reports it; reads lines of
// "registers shared_bytes threads", prints the active blocks per SM (-1: error).
int main() {
    cudaOccDeviceProp p;
    p.computeMajor = 9; p.computeMinor = 0; p.maxThreadsPerBlock = 1024;
    p.maxThreadsPerMultiprocessor = 2048; p.regsPerBlock = 65536;
    p.regsPerMultiprocessor = 65536; p.warpSize = 32; p.sharedMemPerBlock = 49152;
    p.sharedMemPerMultiprocessor = 233472; p.numSms = 132;
    p.sharedMemPerBlockOptin = 232448; p.reservedSharedMemPerBlock = 1024;
    cudaOccDeviceState state;
    int regs, threads;
    size_t shared;
    while (scanf("%d %zu %d", &regs, &shared, &threads) == 3) {
        cudaOccFuncAttributes a;  // opted in to the largest dynamic shared memory
        a.maxThreadsPerBlock = 1024; a.numRegs = regs; a.sharedSizeBytes = 0;
        a.maxDynamicSharedSizeBytes = 232448; a.shmemLimitConfig = FUNC_SHMEM_LIMIT_OPTIN;
        a.numBlockBarriers = 1;
        cudaOccResult r;
        int err = cudaOccMaxActiveBlocksPerMultiprocessor(&r, &p, &a, &state, threads, shared);
        printf("%d\n", err ? -1 : r.activeBlocksPerMultiprocessor);
    }
}
"""


def _occupancy_header():
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + \
        sorted(glob.glob("/usr/local/cuda*"))
    try:
        import nvidia
        roots += [os.path.join(b, d) for b in nvidia.__path__ for d in ("cuda_runtime", "cu13")]
    except ImportError:
        pass
    return next((os.path.join(r, "include") for r in roots
                 if r and os.path.isfile(os.path.join(r, "include", "cuda_occupancy.h"))), None)


def test_occupancy_matches_cuda_occupancy_h(tmp_path):
    """The CUDA toolkit's own calculator (cuda_occupancy.h), on a grid of cases."""
    include = _occupancy_header()
    if include is None or shutil.which("g++") is None:
        pytest.skip("needs cuda_occupancy.h (a CUDA toolkit or the nvidia-cuda-runtime wheel) "
                    "and g++")
    (tmp_path / "occ.cpp").write_text(OCCUPANCY_H)
    subprocess.run(["g++", "-O1", f"-I{include}", "-o", str(tmp_path / "occ"),
                    str(tmp_path / "occ.cpp")], check=True)
    cases = [(r, s, t) for r in (16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 128, 168, 200, 255)
             for s in (0, 1, 1024, 8192, 16384, 40000, 49152, 65536, 100000, 116736, 232448)
             for t in (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)]
    done = subprocess.run([str(tmp_path / "occ")], capture_output=True, text=True, check=True,
                          input="\n".join(f"{r} {s} {t}" for r, s, t in cases))
    blocks = [int(line) for line in done.stdout.split()]
    assert len(blocks) == len(cases) and min(blocks) >= 0
    for (r, s, t), b in zip(cases, blocks):
        assert kr.occupancy(r, s, t)[0] == b * -(-t // 32) / 64, (r, s, t, b)


PTXAS = """ptxas info    : 8 bytes gmem
ptxas info    : Compiling entry function '_Z1kIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z1kIfEvPT_
ptxas         .     24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem
ptxas info    : Compiling entry function '_Z1kIdEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z1kIdEvPT_
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 58 registers, used 0 barriers
"""


def test_ptxas_log_is_parsed():
    assert kr.parse_ptxas(PTXAS) == {
        "_Z1kIfEvPT_": dict(registers=40, stack=24, spill_stores=16, spill_loads=12,
                            static_shared=4096),
        "_Z1kIdEvPT_": dict(registers=58, stack=0, spill_stores=0, spill_loads=0,
                            static_shared=0)}


CUOBJDUMP = """
	code for sm_90
		Function : _Z1kIfEvPT_
	.headerflags	@"EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;            /* 0x00000a00ff017b82 */
                                                                     /* 0x000e220000000800 */
        /*0010*/                   FFMA R2, R3, R4, R2 ;             /* 0x0 */
        /*0020*/                   LDS R4, [R5] ;                    /* 0x0 */
        /*0030*/                   FFMA.FTZ R2, R3, R4, R2 ;         /* 0x0 */
        /*0040*/               @P0 BRA 0x20 ;                        /* 0x0 */
        /*0050*/                   FFMA R2, R3, R4, R2 ;             /* 0x0 */
        /*0060*/              @!P1 BRA 0x10 ;                        /* 0x0 */
        /*0070*/                   EXIT ;                            /* 0x0 */
        /*0080*/                   BRA 0x80;                         /* 0x0 */
        /*0090*/                   NOP;                              /* 0x0 */
"""
NVDISASM = """
//--------------------- .text._Z1kIfEvPT_   --------------------------
	.section	.text._Z1kIfEvPT_,"ax",@progbits
.text._Z1kIfEvPT_:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   FFMA R2, R3, R4, R2 ;
.L_x_0:
        /*0020*/                   LDS R4, [R5] ;
        /*0030*/                   FFMA.FTZ R2, R3, R4, R2 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   FFMA R2, R3, R4, R2 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
.L_x_2:
        /*0080*/                   BRA `(.L_x_2);
        /*0090*/                   NOP;
"""


@pytest.mark.parametrize("text", [CUOBJDUMP, NVDISASM], ids=["cuobjdump", "nvdisasm"])
def test_sass_is_parsed_and_its_main_loop_found(text):
    (symbol, instructions), = kr.parse_sass(text).items()
    assert symbol == "_Z1kIfEvPT_"
    assert [op for _, op, _ in instructions] == ["LDC", "FFMA", "LDS", "FFMA.FTZ", "BRA", "FFMA",
                                                  "BRA", "EXIT", "BRA", "NOP"]
    assert [t for _, _, t in instructions if t is not None] == [0x20, 0x10, 0x80]
    # 9 instructions without the NOP, 3 FFMAs; the loop 0x10..0x60 holds the loop
    # 0x20..0x40, and both hold FMAs: the inner one (3 instructions, 1 FMA) is the main loop
    assert kr.fma_share(instructions, "FFMA") == (9, 3, 3, 1)
    assert kr.fma_share(instructions, "DFMA") == (9, 0, 0, 0)


def test_the_report_compiles_with_the_loaders_options(monkeypatch):
    seen = []

    def compile_cubin(code, names, arch, options, filename):
        seen.append(options)
        return False, "stopped here", {}, None

    monkeypatch.setattr(kr.nvrtc, "compile_cubin", compile_cubin)
    unit = cuda.compile_units()[0]
    with pytest.raises(RuntimeError, match="stopped here"):
        kr.analyse(unit, found={"cuobjdump": None, "nvdisasm": None},
                   code="// not cached\n" + cuda.source(unit.filename))
    assert seen == [(*unit.options, "--ptxas-options=-v")]
    assert seen[0][:len(cuda.NVRTC_OPTIONS)] == cuda.NVRTC_OPTIONS
    assert "-ftz=true" in cuda.NVRTC_OPTIONS  # as CuPy compiles every RawModule
