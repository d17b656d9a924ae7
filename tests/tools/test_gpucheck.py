"""The pieces of .ci/gpu-check that can be checked without a GPU: the skipped-cuda
test finder, the training report, the benchmark's shape list and the documented call.
CI runs `.ci/gpu-check --dry-run` itself (.ci/run)."""
import json
import pathlib
import re

import numpy
import pytest

from gpucnn.tools import bench, gpucheck
from gpucnn.functional import conv

ROOT = pathlib.Path(__file__).resolve().parents[2]

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
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
</testsuite></testsuites>
"""


def test_cuda_skips_finds_skipped_cuda_tests_only(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT)
    found = gpucheck.cuda_skips(report)
    assert found == [
        "tests.test_device_parity::test_training_step[cuda]: no CUDA device here: CuPy is not "
        "installed",
        "tests.test_info::test_gpu_name: CuPy is installed but no CUDA device is usable"]
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


def test_bench_lists_issue_8s_shapes():
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


@pytest.mark.parametrize("step", ["setup", "tests", "sanitizer", "bench", "determinism", "train"])
def test_every_step_is_documented(step):
    assert re.search(rf"\b{step}\b", (ROOT / "docs" / "gpu" / "README.md").read_text())
