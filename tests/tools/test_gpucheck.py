"""The pieces of .ci/gpu-check that can be checked without a GPU: the skipped-cuda
test finder, the training report, the benchmark's shape list and the documented call.
CI runs `.ci/gpu-check --dry-run` itself (.ci/run)."""
import ctypes
import importlib.util
import json
import pathlib
import re
import warnings

import numpy
import pytest

from gpucnn.tools import bench, gpucheck
from gpucnn.functional import conv

ROOT = pathlib.Path(__file__).resolve().parents[2]

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="9">
 <testcase classname="tests.test_device_parity" name="test_training_step[cpu]" time="0.1"/>
 <testcase classname="tests.test_device_parity" name="test_training_step[cuda]" time="0.0">
  <skipped type="pytest.skip" message="no CUDA device here: CuPy is not installed">x</skipped>
 </testcase>
 <testcase classname="tests.test_info" name="test_gpu_name" time="0.0">
  <skipped type="pytest.skip" message="CuPy is installed but no CUDA device is usable">x</skipped>
 </testcase>
 <testcase classname="tests.test_fashion_mnist" name="test_load" time="0.0">
  <skipped type="pytest.skip" message="/usr/share/datasets/fashion-mnist is missing">x</skipped>
 </testcase>
 <testcase classname="tests.test_conv2d" name="test_cuda_forward[float32]" time="0.2"/>
 <testcase classname="tests.gpu.test_backend" name="test_cuda_missing_is_a_clear_error"
  time="0.0"><skipped type="pytest.skip" message="checks the no-GPU messages">x</skipped>
 </testcase>
 <testcase classname="tests.app.test_user_errors" name="test_cuda_without_a_gpu" time="0.0">
  <skipped type="pytest.skip" message="a GPU is usable here">x</skipped>
 </testcase>
 <testcase classname="tests.ops.test_pool" name="test_pool[float32-cuda-2]" time="0.0">
  <skipped type="pytest.skip" message="emulated elsewhere">x</skipped>
 </testcase>
 <testcase classname="tests.ops.test_pool" name="test_pool_cudagraph[x]" time="0.0">
  <skipped type="pytest.skip" message="not here">x</skipped>
 </testcase>
</testsuite></testsuites>
"""


def test_cuda_skips_finds_skipped_cuda_tests_only(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT)
    found = gpucheck.cuda_skips(report)
    assert found == [
        "tests.test_device_parity::test_training_step[cuda]: no CUDA device here: CuPy is not "
        "installed",
        "tests.test_info::test_gpu_name: CuPy is installed but no CUDA device is usable",
        "tests.ops.test_pool::test_pool[float32-cuda-2]: emulated elsewhere"]
    assert gpucheck.main(["cuda-skips", str(report)]) == 1
    report.write_text(JUNIT.replace("<skipped", "<properties").replace("</skipped>",
                                                                       "</properties>"))
    assert gpucheck.main(["cuda-skips", str(report)]) == 0
    assert gpucheck.main(["cuda-skips", str(tmp_path / "missing.xml")]) == 1


def test_train_report_reads_metrics_and_checks_the_accuracy(tmp_path, capsys):
    rows = [dict(epoch=e, test_accuracy=a, images_per_s=s)
            for e, a, s in [(1, 0.85, 9000.0), (2, 0.88, 12000.0), (3, 0.895, 12500.0)]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpucheck.main(["train-report", str(tmp_path), "--min-accuracy", "0.87"]) == 0
    out = capsys.readouterr().out
    assert "epoch 3: test accuracy 89.50%, 12500 images/s" in out and "pass" in out
    assert gpucheck.main(["train-report", str(tmp_path), "--min-accuracy", "0.9"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_lists_its_conv_shapes():
    want = {(64, 1, 28, 28, 32, 5, 1, 2), (64, 32, 14, 14, 64, 5, 1, 2),
            (256, 1, 28, 28, 32, 5, 1, 2), (256, 32, 14, 14, 64, 5, 1, 2),
            (128, 3, 32, 32, 64, 3, 1, 1), (128, 64, 16, 16, 128, 3, 1, 1),
            (64, 16, 32, 32, 32, 3, 2, 1), (64, 16, 32, 32, 32, 3, 1, 2, 2),
            (32, 64, 56, 56, 64, 3, 1, 1), (128, 128, 28, 28, 128, 3, 1, 1),
            (64, 256, 14, 14, 256, 3, 1, 1)}
    assert set(bench.CONV_SHAPES) == want and len(bench.CONV_SHAPES) == len(want)
    assert set(bench.CPU_CONV_SHAPES) <= want
    assert [bench.conv_goal("cuda", s) for s in bench.CONV_SHAPES] == [
        1.5, 1.2, 1.5, 1.2, 1.5, 1.2, 1.5, 1.5, 1.2, 1.2, 1.2]
    for N, C, H, W, K, k, s, p, *d in bench.CONV_SHAPES:
        g = conv.geometry(numpy.zeros((1, C, H, W), numpy.float32),
                          numpy.zeros((K, C, k, k), numpy.float32), None, s, p, d[0] if d else 1)
        assert g.P > 0 and g.Q > 0


def test_documented_device_call_is_the_scripts():
    """The `run` call in .ci/gpu-check's header and in docs/gpu/README.md are the same."""
    pattern = re.compile(r"run\(command=.*\)")
    script = pattern.findall((ROOT / ".ci" / "gpu-check").read_text())
    docs = pattern.findall((ROOT / "docs" / "gpu" / "README.md").read_text())
    assert script and set(docs) == set(script)


def _script_steps():
    """(name, budget) of each step in .ci/gpu-check's STEPS line, and its TOTAL."""
    text = (ROOT / ".ci" / "gpu-check").read_text()
    steps = re.search(r"^STEPS=\(([^)]*)\)", text, re.MULTILINE).group(1).split()
    total = int(re.search(r"^TOTAL=\$\{GPUCHECK_SECONDS:-(\d+)\}", text, re.MULTILINE).group(1))
    return [(s.split(":")[1], int(s.split(":")[2])) for s in steps], total


def test_every_step_is_documented_with_its_budget():
    steps, total = _script_steps()
    docs = (ROOT / "docs" / "gpu" / "README.md").read_text()
    assert [name for name, _ in steps] == ["preflight", "compile", "gputests", "memcheck",
                                           "bench", "determinism", "precision", "parallel", "sanitizers",
                                           "tune", "train"]
    for name, budget in steps:
        assert re.search(rf"\*\*{name}\*\* \[{budget}\]", docs), f"{name} [{budget}] undocumented"
    assert f"run's {total} s" in docs


def test_the_first_six_steps_always_fit_and_the_call_leaves_room_for_a_rerun():
    """Steps 1-6 are the proof: their budgets fit in the run's total, which fits in the
    documented call's timeout_s; two calls of that length fit in a session's 15 minutes
    of device time with a machine start (a few minutes) each."""
    steps, total = _script_steps()
    assert sum(budget for _, budget in steps[:6]) <= total
    call = re.search(r"run\(command=.*timeout_s=(\d+)\)", (ROOT / ".ci" / "gpu-check").read_text())
    timeout = int(call.group(1))
    assert total + 15 <= timeout <= 450


def test_the_gpu_steps_run_with_repeatable_cublas_and_one_blas_thread_per_worker():
    text = (ROOT / ".ci" / "gpu-check").read_text()
    assert re.search(r"^export CUBLAS_WORKSPACE_CONFIG=:4096:8$", text, re.MULTILINE)
    gputests = text[text.index("    gputests)"):text.index("    memcheck)")]
    assert "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $PY -m pytest" in gputests


def test_cuda_skips_counts_no_test_that_skips_by_design_where_a_gpu_is(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT.replace('test_training_step[cuda]', 'test_training_step[x]')
                      .replace("no CUDA device here: CuPy is not installed", "by design")
                      .replace("CuPy is installed but no CUDA device is usable", "by design"))
    assert gpucheck.cuda_skips(report) == [
        "tests.ops.test_pool::test_pool[float32-cuda-2]: emulated elsewhere"]


@pytest.mark.parametrize("log, unavailable", [
    ("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n", True),
    ("========= Target application returned an error\nCUDA error 999\n", True),
    ("cupy_backends.cuda.api.runtime.CUDARuntimeError: cudaErrorUnknown: unknown error\n",
     True),
    ("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 1 error\n",
     False),
    ("========= ERROR SUMMARY: 0 errors\n", False)])
def test_sanitizer_log_tells_an_unusable_sanitizer_from_a_hazard(tmp_path, capsys, log,
                                                                  unavailable):
    path = tmp_path / "memcheck.log"
    path.write_text(log)
    assert (gpucheck.sanitizer_unavailable(log) is not None) == unavailable
    assert gpucheck.main(["sanitizer-log", str(path)]) == (gpucheck.UNAVAILABLE if unavailable
                                                          else 0)
    assert ("sanitizer unavailable on this machine" in capsys.readouterr().out) == unavailable


def test_compile_builds_the_units_asked_for_in_processes_of_their_own(capsys):
    from gpucnn.tools import nvrtc
    if nvrtc.library() is None:
        assert gpucheck.main(["compile", "--nvrtc"]) == gpucheck.UNAVAILABLE
        return
    assert gpucheck.main(["compile", "--nvrtc", "--jobs", "2", "--files", "max_pool2d.cu",
                          "avg_pool2d.cu"]) == 0
    out = capsys.readouterr().out
    assert "kernels/max_pool2d.cu (default): compiles" in out
    assert "kernels/avg_pool2d.cu (default): compiles" in out and "2 compile units" in out
    assert gpucheck.main(["compile", "--nvrtc", "--files", "nothing.cu"]) == 1


def test_preflight_stops_where_cupy_does_not_import(capsys):
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert gpucheck.main(["preflight"]) == 1
        out = capsys.readouterr().out
        assert "cupy: does not import" in out and "FAIL" in out
    else:
        assert gpucheck.main(["preflight"]) == (0 if gpucheck.backend.cuda_available() else 1)


class _OneRankNccl:
    """cupy.cuda.nccl for a world of one, in the stand-in's memory: allReduce sums one
    rank's buffer, which leaves it as it is; `scale` plants a wrong sum."""

    def __init__(self, scale=1.0):
        self.scale, self.calls = scale, []
        outer = self

        class NcclCommunicator:
            def __init__(self, ndev, commId, rank):
                assert (ndev, rank, len(commId)) == (1, 0, 128)

            def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
                assert (datatype, op) == (7, 0) and stream != 0  # float32 sum, off stream 0
                outer.calls.append(count)
                memory = (ctypes.c_float * count).from_address(recvbuf)
                data = numpy.frombuffer(memory, numpy.float32)
                data[...] = numpy.frombuffer((ctypes.c_float * count).from_address(sendbuf),
                                             numpy.float32) * outer.scale

        self.NcclCommunicator = NcclCommunicator

    @staticmethod
    def get_unique_id():
        return (0,) * 128

    @staticmethod
    def get_version():
        return 22304


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_data_parallel_check_on_the_standins(standin, capsys, scale):
    """gpu-check's data-parallel step on the CuPy stand-in and a one-rank NCCL: every
    gradient goes through NCCL, and a wrong sum is a difference it reports. The
    stand-in captures nothing, so the check must fail on exactly that and nothing else
    where the sum is right."""
    from gpucnn import distributed
    nccl = _OneRankNccl(scale)
    previous = distributed.set_nccl_module(nccl)
    try:
        assert not gpucheck.data_parallel(batch=4, steps=5)
    finally:
        distributed.set_nccl_module(previous)
    out = capsys.readouterr().out
    assert "graphed runs replayed a captured step: [False, False]" in out
    assert len(nccl.calls) == 2 * 5 and len(set(nccl.calls)) == 1  # one bucket a step, 2 runs
    assert out.count("bitwise equal to plain, eager") == (4 if scale == 1 else 2)
    for run in ("NCCL, eager", "NCCL, graphed"):
        assert (f"{run:<15} DIFFERS from plain, eager in 0.weight" in out) == (scale != 1)


def test_determinism_check_on_the_standin(standin, capsys):
    """gpu-check's determinism step as a GPU runs it, on the CuPy stand-in: every
    precision in turn, two runs compared bit for bit and one step against float64,
    the CPU's reference computed without a warning about a GPU-only precision."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gpucheck.determinism("cuda", batch=2, steps=1)
    out = capsys.readouterr().out
    for p in ("fp32", "tf32", "3xtf32"):
        assert f"[{p}] two runs of 1 steps: bitwise equal" in out
        assert re.search(rf"\[{p}\] one float32 step on cuda vs float64 on cpu: worst \S+ "
                         rf"\(limit \S+\): pass", out)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None,
                    reason="CuPy is installed here: its NCCL would be found")
def test_data_parallel_check_without_nccl_is_not_run(standin, capsys):
    """Where CuPy has no NCCL the step is one this machine cannot run, not a failure."""
    assert gpucheck.main(["data-parallel"]) == gpucheck.UNAVAILABLE
    assert "NCCL unavailable on this machine (NCCL is not available through CuPy" in (
        capsys.readouterr().out)
