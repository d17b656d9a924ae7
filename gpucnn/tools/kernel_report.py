"""The static report behind ``gpucnn info --kernels``: what every kernel costs
on an H100 (sm_90), read from its machine code, without a GPU.

Every compilation the loader performs (cuda.compile_units(): each kernel file,
configuration and template instantiation) is compiled by NVRTC to an sm_90
cubin with ptxas's resource report (``--ptxas-options=-v``): registers, stack
frame and spills (local memory), static shared memory. The launcher's threads
per block and dynamic shared memory then give the theoretical occupancy by the
CUDA occupancy calculator's rules for compute capability 9.0. cuobjdump (or
nvdisasm) disassembles the cubin to SASS, where the report counts the fused
multiply-adds (FFMA, DFMA for double; the tensor-core MMAs, HMMA, in the
tensor-core builds) among the instructions: over the whole kernel, and over its main loop (the innermost loop with the most of them),
which is what a GEMM-like kernel spends its time in. The tools come from the
nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels, a CUDA toolkit, or PATH;
where neither is found, the SASS columns say so.
"""
import collections
import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile

from ..backends import cuda
from . import nvrtc

ARCH = "sm_90"
Limits = collections.namedtuple(
    "Limits", "warp_size max_warps max_blocks registers register_unit sub_partitions "
              "max_registers_per_thread shared shared_unit shared_reserved max_shared_per_block")
# Compute capability 9.0 (H100), as in the CUDA occupancy calculator: registers are
# allocated per warp in units of 256 and split over 4 sub-partitions; shared
# memory in units of 128 bytes, with 1 KiB reserved per block, up to 228 KiB per
# SM (the largest carveout, which the driver picks when a kernel needs it).
SM90 = Limits(warp_size=32, max_warps=64, max_blocks=32, registers=65536, register_unit=256,
              sub_partitions=4, max_registers_per_thread=255, shared=228 * 1024,
              shared_unit=128, shared_reserved=1024, max_shared_per_block=227 * 1024)

Kernel = collections.namedtuple(
    "Kernel", "name config symbol threads registers stack spill_stores spill_loads "
              "static_shared dynamic_shared occupancy limiter fma_op instructions fmas "
              "loop_instructions loop_fmas")
Kernel.__doc__ = """One kernel instantiation in one configuration. The SASS counts
(instructions .. loop_fmas) are None where no disassembler was found; threads,
occupancy and limiter None where the launcher's block size is not known."""


def tools():
    """{"cuobjdump": path or None, "nvdisasm": path or None}."""
    found = {}
    for tool in ("cuobjdump", "nvdisasm"):
        candidates = []
        try:
            import nvidia
            for base in nvidia.__path__:  # cu13 wheels: nvidia/cu13/bin; cu12: nvidia/cuda_<tool>
                candidates += sorted(glob.glob(os.path.join(base, "cu1*", "bin", tool)))
                candidates += sorted(glob.glob(os.path.join(base, f"cuda_{tool}", "bin", tool)))
        except ImportError:
            pass
        for var in ("CUDA_HOME", "CUDA_PATH"):
            if os.environ.get(var):
                candidates.append(os.path.join(os.environ[var], "bin", tool))
        candidates += sorted(glob.glob(f"/usr/local/cuda*/bin/{tool}"))
        candidates.append(shutil.which(tool))
        found[tool] = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    return found


def missing_tools_note(found):
    if found["cuobjdump"] or found["nvdisasm"]:
        return None
    return ("SASS columns n/a: neither cuobjdump nor nvdisasm was found "
            "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, or a CUDA toolkit on PATH)")


# ---- ptxas's resource report ---------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log):
    """{symbol: dict(registers, stack, spill_stores, spill_loads, static_shared)}
    from NVRTC's log with --ptxas-options=-v."""
    out, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m[1], dict(registers=None, stack=0, spill_stores=0,
                                                 spill_loads=0, static_shared=0))
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m[1])
            m = _SMEM.search(line)
            current["static_shared"] = int(m[1]) if m else 0
    return out


# ---- SASS ----------------------------------------------------------------------------
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_CUOBJDUMP_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_NVDISASM_FUNCTION = re.compile(r"^\.text\.(\S+):\s*$")
_LABEL = re.compile(r"^(\.L\w+):\s*$")
_TARGET = re.compile(r"(?:0x([0-9a-fA-F]+)|`\((\.L\w+)\))\s*$")


def parse_sass(text):
    """{symbol: [(address, opcode, branch target address or None)]}, from the
    output of cuobjdump -sass or nvdisasm."""
    functions, labels, current, pending = {}, {}, None, []
    for line in text.splitlines():
        m = _CUOBJDUMP_FUNCTION.match(line) or _NVDISASM_FUNCTION.match(line)
        if m:
            current = functions.setdefault(m[1], [])
            labels[m[1]] = {}
            pending = []
            continue
        if current is None:
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m[1])
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        address = int(m[1], 16)
        symbol = next(k for k, v in functions.items() if v is current)
        for label in pending:
            labels[symbol][label] = address
        pending = []
        tokens = m[2].split()
        if tokens and tokens[0].startswith("@"):
            tokens = tokens[1:]
        if not tokens:
            continue
        target = None
        if tokens[0].startswith(("BRA", "BRX", "JMP")):
            t = _TARGET.search(m[2])
            if t:
                target = int(t[1], 16) if t[1] else t[2]
        current.append([address, tokens[0], target])
    for symbol, instructions in functions.items():
        for ins in instructions:
            if isinstance(ins[2], str):
                ins[2] = labels[symbol].get(ins[2])
    return {k: [tuple(i) for i in v] for k, v in functions.items()}


def fma_share(instructions, fma_op):
    """(instructions, FMAs, main-loop instructions, main-loop FMAs); NOPs (the
    padding after the end) are not counted. A loop is the range of a backward
    branch; the main loop is, among the loops that hold FMAs but no inner loop
    holding FMAs (in a GEMM, the reduction loop with its unrolled FMAs and its
    loader loops), the one with the most. Zeros where no loop holds an FMA."""
    body = [(a, op, t) for a, op, t in instructions if op != "NOP"]

    def is_fma(op):
        return op == fma_op or op.startswith((fma_op + ".", fma_op + "32I"))

    loops = {}
    for lo, hi in {(t, a) for a, op, t in body if t is not None and t < a}:
        inside = [op for a, op, _ in body if lo <= a <= hi]
        fmas = sum(map(is_fma, inside))
        if fmas:
            loops[lo, hi] = (fmas, len(inside))
    innermost = [v for (lo, hi), v in loops.items()
                 if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in loops)]
    fmas, size = max(innermost, key=lambda v: (v[0], -v[1]), default=(0, 0))
    return len(body), sum(is_fma(op) for _, op, _ in body), size, fmas


def disassemble(cubin, found):
    """The cubin's SASS as text (cuobjdump -sass, else nvdisasm), or None."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernels.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        for tool, args in (("cuobjdump", ["-sass"]), ("nvdisasm", ["-c"])):
            if found[tool]:
                done = subprocess.run([found[tool], *args, path], capture_output=True, text=True)
                if done.returncode == 0 and "/*0000*/" in done.stdout:
                    return done.stdout
    return None


# ---- occupancy -----------------------------------------------------------------------
def occupancy(registers, shared, threads, limits=SM90):
    """(active warps / maximum warps per SM, what limits it) for blocks of
    `threads` threads using `registers` per thread and `shared` bytes of shared
    memory (static + dynamic) per block."""
    warps = -(-threads // limits.warp_size)
    per_warp = -(-max(registers, 1) * limits.warp_size // limits.register_unit) * \
        limits.register_unit
    by_registers = (limits.registers // limits.sub_partitions // per_warp) * \
        limits.sub_partitions // warps
    block_shared = -(-(shared + limits.shared_reserved) // limits.shared_unit) * limits.shared_unit
    by_shared = limits.shared // block_shared if shared <= limits.max_shared_per_block else 0
    bounds = {"warps": limits.max_warps // warps, "blocks": limits.max_blocks,
              "registers": by_registers, "shared memory": by_shared}
    if registers > limits.max_registers_per_thread:
        bounds["registers"] = 0
    limiter = min(bounds, key=lambda k: (bounds[k], k != "warps"))
    return bounds[limiter] * warps / limits.max_warps, limiter


# ---- the report ----------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _compile(code, name_expressions, options, filename):
    return nvrtc.compile_cubin(code, name_expressions, arch=ARCH,
                               options=(*options, "--ptxas-options=-v"), filename=filename)


def analyse(unit, found=None, code=None):
    """The Kernels of one CompileUnit, compiled for sm_90 (from code, by default
    kernels/<unit.filename>); found: tools(). Raises RuntimeError with NVRTC's
    log where it does not compile."""
    found = tools() if found is None else found
    ok, log, lowered, cubin = _compile(code if code is not None else cuda.source(unit.filename),
                                       tuple(unit.name_expressions), tuple(unit.options),
                                       unit.filename)
    if not ok:
        raise RuntimeError(f"kernels/{unit.filename} ({unit.config}) does not compile for "
                           f"{ARCH}:\n{log}")
    resources = parse_ptxas(log)
    sass = disassemble(cubin, found)
    functions = parse_sass(sass) if sass else {}
    dynamic_shared = getattr(unit, "dynamic_shared", None) or {}
    # a tensor-core build's main loop is counted in MMAs (HMMA), not FMAs
    tensor_core = any(o.startswith("-DCONV_MMA=") and o != "-DCONV_MMA=0" for o in unit.options)
    kernels = []
    for name in unit.name_expressions:
        symbol = lowered[name]
        if symbol not in resources:
            raise RuntimeError(f"ptxas reported nothing for {name} ({symbol}):\n{log}")
        r = resources[symbol]
        threads = unit.threads.get(name.split("<")[0])
        dynamic = dynamic_shared.get(name, 0)
        occ, limiter = (occupancy(r["registers"], r["static_shared"] + dynamic, threads)
                        if threads else (None, None))
        fma_op = "HMMA" if tensor_core else "DFMA" if "double" in name else "FFMA"
        counts = fma_share(functions[symbol], fma_op) if symbol in functions else (None,) * 4
        kernels.append(Kernel(name, unit.config, symbol, threads, r["registers"], r["stack"],
                              r["spill_stores"], r["spill_loads"], r["static_shared"], dynamic,
                              occ, limiter, fma_op, *counts))
    return kernels


def _percent(part, whole):
    return f"{100 * part / whole:.0f}%" if whole else "-"


def format_table(kernels):
    wk = max([38] + [len(k.name) for k in kernels])
    wc = max([10] + [len(k.config) for k in kernels])
    head = (f"{'kernel':<{wk}} {'config':<{wc}} {'thr':>4} {'regs':>4} {'stack':>5} "
            f"{'spill st/ld':>11} {'smem st+dyn':>12} {'occupancy':>19} {'SASS':>5} "
            f"{'FMA':>5} {'FMA%':>5} {'loop':>5} {'loop FMA%':>9}")
    lines = [head, "-" * len(head)]
    for k in kernels:
        occ = (f"{100 * k.occupancy:.0f}% ({k.limiter})" if k.occupancy is not None else "?")
        sass = ("n/a",) * 5 if k.instructions is None else (
            k.instructions, k.fmas, _percent(k.fmas, k.instructions),
            k.loop_instructions or "-", _percent(k.loop_fmas, k.loop_instructions))
        lines.append(f"{k.name:<{wk}} {k.config:<{wc}} {k.threads or '?':>4} {k.registers:>4} "
                     f"{k.stack:>5} {f'{k.spill_stores}/{k.spill_loads}':>11} "
                     f"{f'{k.static_shared}+{k.dynamic_shared}':>12} {occ:>19} {sass[0]:>5} "
                     f"{sass[1]:>5} {sass[2]:>5} {sass[3]:>5} {sass[4]:>9}")
    return "\n".join(lines)


LEGEND = """regs: registers per thread; stack: stack frame bytes (local memory); spill st/ld:
bytes of register spills stored/loaded; smem st+dyn: static + dynamic shared memory
per block (bytes, dynamic as the launcher asks); occupancy: theoretical active warps
per SM on sm_90 with the launcher's threads per block (thr), and what limits it;
SASS: instructions (NOPs excluded); FMA: FFMA (DFMA for double; in the tensor-core
builds, configs "... tf32" and "... 3xtf32", the MMAs: HMMA, one per m16n8k8 step
of a warp) among them; loop: instructions of the main loop (of the innermost loops
holding FMAs, the one with the most) and its FMA share; "-" where no loop holds an
FMA."""


def main(out=print):
    """Print the report; returns an exit status (1 where NVRTC is missing or a
    kernel does not compile)."""
    if nvrtc.library() is None:
        out("NVRTC: not found, so nothing could be compiled "
            "(pip install nvidia-cuda-nvrtc-cu12)")
        return 1
    found = tools()
    major, minor = nvrtc.version()
    sass_tool = found["cuobjdump"] or found["nvdisasm"]
    out(f"Static report for {ARCH} (H100): NVRTC {major}.{minor} to cubin, ptxas -v"
        + (f", SASS from {sass_tool}" if sass_tool else ""))
    kernels, status = [], 0
    for unit in cuda.compile_units():
        try:
            kernels += analyse(unit, found)
        except RuntimeError as e:
            out(str(e))
            status = 1
    out(format_table(kernels))
    out(LEGEND)
    note = missing_tools_note(found)
    if note:
        out(note)
    elif any(k.instructions is None for k in kernels):
        out(f"SASS columns n/a where {sass_tool} could not disassemble the cubin "
            f"(an older tool than NVRTC {major}.{minor}?)")
    spilling = [k.name for k in kernels if k.spill_stores or k.spill_loads or k.stack]
    if spilling:
        out(f"local memory (spills or stack) in: {', '.join(spilling)}")
    return status
