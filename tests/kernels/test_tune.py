"""`gpucnn tune`: the shapes it tunes, the cache it writes, the launchers reading it,
and its one-line errors. Timed here through the emulated kernels."""
import json

import numpy
import pytest

from emulator import EmulatedModule
from gpucnn.app import cli
from gpucnn.backends.cuda import conv as cuda_conv
from gpucnn.backends.cuda.kernels import Kernels
from gpucnn.tools import tune
from gpucnn.functional import conv


def test_model_shapes():
    g1, g2 = tune.model_geometries("lenet", 256)
    assert (g1.N, g1.C, g1.H, g1.K, g1.R, g1.pt) == (256, 1, 28, 32, 5, 2)
    assert (g2.N, g2.C, g2.H, g2.K, g2.R, g2.pt) == (256, 32, 14, 64, 5, 2)


def test_bench_shapes_parse_when_listed():
    try:
        shapes = tune.bench_geometries()
    except ValueError as e:
        pytest.skip(str(e))
    assert shapes and all(isinstance(g, conv.ConvGeometry) for g in shapes)


def test_tuned_choices_are_cached_and_used(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tune.cache_path() == tmp_path / "gpucnn" / "tune.json"
    kernels = Kernels(numpy, EmulatedModule, device_name="Emulated GPU")
    g = conv.geometry(numpy.zeros((2, 3, 6, 6)), numpy.zeros((4, 3, 3, 3)), None, padding=1)
    chosen = tune.tune(kernels, [g], (numpy.float32,), repeat=1, report=lambda line: None)
    assert set(chosen) == {tune.entry_key(p, g, numpy.float32) for p in cuda_conv.PASSES}
    assert set(chosen.values()) <= set(cuda_conv.CONV_CONFIGS)
    data = json.loads(tune.cache_path().read_text())
    assert data["Emulated GPU"] == chosen
    assert [p.name for p in tune.cache_path().parent.iterdir()] == ["tune.json"]  # no temp left

    # plant a choice the heuristic would not make: a new Kernels must use it...
    key = tune.entry_key("forward", g, numpy.float32)
    heuristic = cuda_conv.heuristic_config("forward", g)
    planted = next(c for c in cuda_conv.CONV_CONFIGS if c != heuristic)
    data["Emulated GPU"][key] = planted
    tune.cache_path().write_text(json.dumps(data))
    fresh = Kernels(numpy, EmulatedModule, device_name="Emulated GPU")
    assert fresh.config_for("forward", g, numpy.float32) == planted
    # ...only on that GPU, and keep it once chosen
    other = Kernels(numpy, EmulatedModule, device_name="Another GPU")
    assert other.config_for("forward", g, numpy.float32) == heuristic
    tune.cache_path().unlink()
    assert fresh.config_for("forward", g, numpy.float32) == planted


def test_a_corrupt_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tune.cache_path().parent.mkdir(parents=True)
    tune.cache_path().write_text("{not json")
    assert tune.choices_for("Emulated GPU") == {}


@pytest.mark.parametrize("argv, message", [
    (["tune", "--device", "cpu"], "on a GPU"),
    (["tune", "--model", "nope"], "unknown model 'nope'"),
    (["tune", "--batch-size", "0"], "batch size must be a positive int"),
])
def test_bad_input_gets_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
