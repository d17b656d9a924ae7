"""ONNX export (gpucnn.onnx_export, Module.to_onnx) run in onnxruntime against
gpucnn's eval forward: float32, within rtol 1e-4, atol 1e-5 (the same sums in
another order)."""
import json

import numpy
import pytest

import gpucnn
from gpucnn import nn, onnx_export
from gpucnn.app.models import MODELS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = dict(rtol=1e-4, atol=1e-5)


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _compare(tmp_path, model, input_shape, batch=3, seed=0):
    model.eval()
    x = numpy.random.default_rng(seed).standard_normal((batch,) + input_shape)
    x = x.astype(numpy.float32)
    path = model.to_onnx(tmp_path / "m.onnx", input_shape)
    numpy.testing.assert_allclose(_run(path, x), model(x), **TOL)
    return path


def _with_statistics(bn, seed=1):
    """A BatchNorm2D with non-trivial weights and running statistics."""
    rng = numpy.random.default_rng(seed)
    C = bn.num_features
    bn.load_state_dict({"weight": rng.uniform(0.5, 2, C).astype(numpy.float32),
                        "bias": rng.standard_normal(C).astype(numpy.float32),
                        "running_mean": rng.standard_normal(C).astype(numpy.float32),
                        "running_var": rng.uniform(0.5, 2, C).astype(numpy.float32),
                        "num_batches_tracked": numpy.array(5)})
    return bn


CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=0),
         dict(kernel_size=4, padding="same"), dict(kernel_size=(2, 3), padding="same", dilation=2),
         dict(kernel_size=3, padding="valid", dilation=(2, 1)), dict(kernel_size=3, groups=2),
         dict(kernel_size=1, groups=4, bias=False),
         dict(kernel_size=5, stride=(2, 3), padding=(2, 1))]


@pytest.mark.parametrize("kwargs", CONVS, ids=str)
def test_conv2d(tmp_path, kwargs):
    _compare(tmp_path, nn.Conv2D(4, 8, **kwargs), (4, 11, 10))


POOLS = [dict(kernel_size=2), dict(kernel_size=3, stride=2, ceil_mode=True),
         dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
         dict(kernel_size=2, stride=3, ceil_mode=True), dict(kernel_size=3, stride=1, padding=1),
         dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0))]


@pytest.mark.parametrize("kwargs", POOLS + [dict(kernel_size=3, stride=2, dilation=2, padding=1),
                                            dict(kernel_size=2, dilation=(2, 3), ceil_mode=True)],
                         ids=str)
def test_max_pool2d(tmp_path, kwargs):
    _compare(tmp_path, nn.MaxPool2D(**kwargs), (2, 11, 10))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("divisor_override", [None, 5, -3])
@pytest.mark.parametrize("kwargs", POOLS, ids=str)
def test_avg_pool2d(tmp_path, kwargs, count_include_pad, divisor_override):
    _compare(tmp_path, nn.AvgPool2D(**kwargs, count_include_pad=count_include_pad,
                                    divisor_override=divisor_override), (2, 11, 10))


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm2d_in_eval(tmp_path, affine):
    bn = nn.BatchNorm2D(3, eps=1e-3, affine=affine)
    if affine:
        _with_statistics(bn)
    else:
        bn.running_mean[...] = [0.5, -1, 2]
        bn.running_var[...] = [0.25, 2, 1]
    _compare(tmp_path, bn, (3, 5, 4))


def test_the_other_layers(tmp_path):
    model = nn.Sequential(
        nn.Residual(nn.Sequential(nn.Conv2D(3, 3, 3, padding=1), nn.ReLU())),
        nn.Residual(nn.Conv2D(3, 6, 3, stride=2, padding=1), nn.Conv2D(3, 6, 1, stride=2)),
        nn.Dropout(0.5), nn.Identity(), nn.GlobalAvgPool2D(), nn.Linear(6, 5), nn.ReLU(),
        nn.Dropout(0.2), nn.Linear(5, 4, bias=False))
    path = _compare(tmp_path, model, (3, 9, 8))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Add", "Gemm", "GlobalAveragePool", "Relu", "Conv"} <= ops
    assert "Dropout" not in ops


def test_flatten_and_a_dynamic_batch(tmp_path):
    model = nn.Sequential(nn.Conv2D(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    path = _compare(tmp_path, model, (1, 6, 6))
    for batch in (1, 7):
        x = numpy.random.default_rng(batch).standard_normal((batch, 1, 6, 6)).astype(numpy.float32)
        numpy.testing.assert_allclose(_run(path, x), model(x), **TOL)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_built_in_model(tmp_path, name):
    spec = MODELS[name]
    model = spec.build(num_classes=10, in_channels=spec.input_shape[0])
    for _, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2D):
            _with_statistics(m)
    _compare(tmp_path, model, spec.input_shape)


def test_normalization_in_the_graph_and_the_metadata(tmp_path):
    model = nn.Sequential(nn.Conv2D(2, 3, 3), nn.GlobalAvgPool2D()).eval()
    stats = dict(mean=[0.5, -0.25], std=[0.2, 2.0])
    path = gpucnn.onnx_export.export(model, tmp_path / "n.onnx", (2, 5, 5), normalization=stats,
                                     classes=["cat", "dog", numpy.int64(7)])
    x = numpy.random.default_rng(0).random((2, 2, 5, 5)).astype(numpy.float32)
    mean, std = (numpy.array(stats[k], numpy.float32).reshape(1, 2, 1, 1) for k in ("mean", "std"))
    numpy.testing.assert_allclose(_run(path, x), model((x - mean) / std), **TOL)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["classes"] == ["cat", "dog", 7]
    assert meta["normalization"] == dict(stats, in_graph=True)
    assert meta["input_shape"] == [2, 5, 5]


def test_a_layer_without_an_onnx_form_is_named(tmp_path):
    class Swish(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), Swish()))
    with pytest.raises(onnx_export.OnnxExportError, match=r"layer 1\.1 \(Swish\) has no ONNX"):
        model.to_onnx(tmp_path / "x.onnx", (1, 4, 4))
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("model, shape, match", [
    (nn.BatchNorm2D(2, track_running_stats=False), (2, 3, 3), "track_running_stats"),
    (nn.MaxPool2D(3), (1, 2, 2), r"layer  \(MaxPool2D\).*too small"),
    (nn.ReLU(), (1, 28), r"input_shape must be one sample's \(C, H, W\).*\(1, 28\)"),
    (nn.ReLU(), (1, 0, 3), r"input_shape .*\(1, 0, 3\)")])
def test_bad_exports_say_why(tmp_path, model, shape, match):
    with pytest.raises(onnx_export.OnnxExportError, match=match):
        model.to_onnx(tmp_path / "x.onnx", shape)


@pytest.mark.parametrize("stats, match", [(dict(mean=0.0), "keys 'mean' and 'std'"),
                                          (dict(mean=0.0, std=0.0), "all positive"),
                                          (dict(mean=[0, 1, 2], std=1.0), r"one per channel"),
                                          (dict(mean="a", std=1.0), r"\['mean'\] .*got 'a'")])
def test_bad_normalization_is_refused(tmp_path, stats, match):
    with pytest.raises(onnx_export.OnnxExportError, match=match):
        nn.ReLU().to_onnx(tmp_path / "x.onnx", (2, 3, 3), normalization=stats)


def test_a_missing_onnx_package_is_one_clear_error(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(onnx_export.OnnxExportError, match=r"pip install 'gpucnn\[onnx\]'"):
        nn.ReLU().to_onnx(tmp_path / "x.onnx", (1, 3, 3))


@pytest.mark.parametrize("model", [nn.Sequential(nn.Conv2D(1, 2, 3), nn.ReLU()),
                                   nn.Sequential(nn.BatchNorm2D(4))])
def test_an_input_with_other_channels_is_one_clear_error(tmp_path, model):
    with pytest.raises(onnx_export.OnnxExportError, match=r"layer 0 .* needs \d channels"):
        model.eval().to_onnx(tmp_path / "m.onnx", (3, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


def test_a_path_in_a_missing_folder_is_one_clear_error(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(onnx_export.OnnxExportError, match=r"its folder .*nodir does not exist"):
        model.to_onnx(tmp_path / "nodir" / "m.onnx", (1, 2, 2))
