"""gpucnn bench --precision: every precision's rows at the smoke size, on the CPU (fp32
only, said so) and on the stand-in (all three, through the emulated tensor cores)."""
import gpucnn
from gpucnn.tools import bench_precision


def test_cpu_runs_fp32_only_and_says_why(capsys):
    result = bench_precision.run("cpu", repeat=1, smoke=True)
    assert {r["precision"] for r in result["rows"]} == {"fp32", "default"}
    assert "apply on a GPU only" in capsys.readouterr().out
    conv_rows = [r for r in result["rows"] if r["precision"] == "fp32"]
    assert len(conv_rows) == 3 and all(r["gpucnn_ms"] > 0 for r in conv_rows)
    assert all(r["gpucnn_error"] is None or r["gpucnn_error"] < 1e-6 for r in conv_rows)


def test_standin_runs_every_precision_and_restores_the_setting(standin):
    before = gpucnn.get_conv_precision()
    result = bench_precision.run("cuda", repeat=1, smoke=True)
    assert [r["precision"] for r in result["rows"][:9]] == ["fp32"] * 3 + ["tf32"] * 3 + \
        ["3xtf32"] * 3
    assert [r["case"].split(",")[0] for r in result["rows"][9:]] == ["LeNet SGD step",
                                                                     "ResNet SGD step"]
    assert gpucnn.get_conv_precision() == before
