"""ONNX export: a model's eval-mode forward as an ONNX graph (opset 17).

``export(model, path, input_shape)`` (also ``Module.to_onnx``) writes a graph of
float32 input ``input`` (batch, C, H, W), the batch dimension dynamic, and output
``output``. Each layer maps to standard operators:

    Conv2D            Conv (groups, dilation, 'same' padded bottom/right as PyTorch)
    MaxPool2D         Pad(-inf) + MaxPool, the padding explicit so that ceil_mode
                      follows gpucnn's rule (a last window starting in the padding
                      is dropped) whatever the runtime's own ceil rule is
    AvgPool2D         Pad(0) + AveragePool + Mul by a constant: ONNX has no
                      divisor_override, and the constant also carries
                      count_include_pad and the ceil_mode clipping exactly
    BatchNorm2D       BatchNormalization with the running statistics (eval)
    Residual          the body's and the shortcut's graphs joined by Add
    GlobalAvgPool2D   GlobalAveragePool + Flatten
    Flatten, ReLU     Flatten (axis 1), Relu
    Linear            Gemm (transB=1)
    Dropout, Identity nothing

The spatial size is fixed by input_shape (the pools' constants depend on it).
The normalisation (x - mean) / std, where given, becomes the first two nodes; it
and the class names are also written to the model's metadata (JSON values).
The ``onnx`` package (the 'onnx' extra) builds the file and checks it.
"""
import json
import math
import os

import numpy

from . import backend, interop, validate
from .errors import UserError
from .functional import _checks
from .functional import conv as conv_f
from .functional import pool as pool_f

OPSET = 17
IR_VERSION = 8  # opset 17's: runtimes older than the onnx package still read the file

__all__ = ["export", "OnnxExportError", "OPSET"]


class OnnxExportError(UserError, ValueError):
    """The model (a layer of it, or an argument) cannot be written as ONNX, or the
    onnx package is missing."""


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise OnnxExportError(f"ONNX export needs the onnx package ({e}); install it with "
                              "pip install 'gpucnn[onnx]' (or pip install onnx)") from None
    return onnx


class _Graph:
    """The nodes and constants of the graph being built, with fresh value names."""

    def __init__(self, onnx):
        self.onnx, self.nodes, self.constants, self._count = onnx, [], [], 0

    def _name(self, hint):
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, hint, array, dtype=numpy.float32):
        name = self._name(hint)
        array = numpy.ascontiguousarray(backend.to_numpy(array), dtype=dtype)
        self.constants.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def node(self, op, inputs, hint, **attributes):
        out = self._name(hint)
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out],
                                                     name=self._name(op), **attributes))
        return out


def _channels(m, shape, where, channels):
    if shape[1] != channels:
        raise OnnxExportError(f"layer {where} ({m!r}) gets input of shape {shape}; it needs "
                              f"{channels} channels")


def _conv(graph, m, x, shape, where):
    N, C, H, W = shape
    _channels(m, shape, where, m.in_channels)
    a = m._arguments
    R, S = m.kernel_size
    top, bottom, left, right = conv_f.padding_amounts(a.padding, R, S, (a.sh, a.sw), (a.dh, a.dw))
    P = _checks.output_size(H, R, a.sh, top + bottom, a.dh, name=f"layer {where} output height")
    Q = _checks.output_size(W, S, a.sw, left + right, a.dw, name=f"layer {where} output width")
    inputs = [x, graph.constant(f"{where}.weight", m.weight.data)]
    if m.bias is not None:
        inputs.append(graph.constant(f"{where}.bias", m.bias.data))
    y = graph.node("Conv", inputs, f"{where}.conv", kernel_shape=[R, S], strides=[a.sh, a.sw],
                   dilations=[a.dh, a.dw], group=a.groups, pads=[top, left, bottom, right])
    return y, (N, m.out_channels, P, Q)


def _explicit_padding(graph, x, g, value, where):
    """Pad x so that a pool without padding, in floor mode, gives exactly gpucnn's
    P x Q windows: the start by (ph, pw), the end by what the last window needs."""
    end_h = max(0, (g.P - 1) * g.sh + g.dh * (g.R - 1) + 1 - g.H - g.ph)
    end_w = max(0, (g.Q - 1) * g.sw + g.dw * (g.S - 1) + 1 - g.W - g.pw)
    if g.ph == g.pw == end_h == end_w == 0:
        return x
    pads = graph.constant(f"{where}.pads", [0, 0, g.ph, g.pw, 0, 0, end_h, end_w], numpy.int64)
    fill = graph.constant(f"{where}.fill", value)
    return graph.node("Pad", [x, pads, fill], f"{where}.pad", mode="constant")


def _max_pool(graph, m, x, shape, where):
    g = pool_f.geometry_for(tuple(shape), m._arguments, name=f"layer {where} input")
    x = _explicit_padding(graph, x, g, -numpy.inf, where)
    y = graph.node("MaxPool", [x], f"{where}.maxpool", kernel_shape=[g.R, g.S],
                   strides=[g.sh, g.sw], dilations=[g.dh, g.dw])
    return y, (g.N, g.C, g.P, g.Q)


def _avg_divisors(g):
    """(P, Q) of each window's divisor D, PyTorch's rule (functional.pool's docstring)."""
    if g.divisor_override is not None:
        return numpy.full((g.P, g.Q), float(g.divisor_override))
    sizes = []
    for out, step, pad, size, taps in ((g.P, g.sh, g.ph, g.H, g.R), (g.Q, g.sw, g.pw, g.W, g.S)):
        start = numpy.arange(out) * step - pad
        end = numpy.minimum(start + taps, size + pad)
        if not g.count_include_pad:
            start, end = numpy.maximum(start, 0), numpy.minimum(end, size)
        sizes.append((end - start).astype(numpy.float64))
    return numpy.outer(*sizes)


def _avg_pool(graph, m, x, shape, where):
    g = pool_f.geometry_for(tuple(shape), m._arguments, name=f"layer {where} input")
    x = _explicit_padding(graph, x, g, 0.0, where)
    # AveragePool over windows wholly inside the padded input divides by R*S; the
    # constant turns that into gpucnn's divisor, window by window
    y = graph.node("AveragePool", [x], f"{where}.avgpool", kernel_shape=[g.R, g.S],
                   strides=[g.sh, g.sw])
    scale = (g.R * g.S / _avg_divisors(g)).reshape(1, 1, g.P, g.Q)
    return graph.node("Mul", [y, graph.constant(f"{where}.scale", scale)], f"{where}.avg"), \
        (g.N, g.C, g.P, g.Q)


def _batch_norm(graph, m, x, shape, where):
    if not m.track_running_stats:
        raise OnnxExportError(f"layer {where} ({m!r}) normalises with each batch's statistics "
                              "in eval (track_running_stats=False), which has no ONNX form; "
                              "use track_running_stats=True")
    C = m.num_features
    _channels(m, shape, where, C)
    scale = m.weight.data if m.affine else numpy.ones(C)
    bias = m.bias.data if m.affine else numpy.zeros(C)
    inputs = [x] + [graph.constant(f"{where}.{k}", v) for k, v in (
        ("weight", scale), ("bias", bias), ("running_mean", m.running_mean),
        ("running_var", m.running_var))]
    return graph.node("BatchNormalization", inputs, f"{where}.bn", epsilon=float(m.eps)), shape


def _linear(graph, m, x, shape, where):
    if len(shape) != 2 or shape[1] != m.in_features:
        raise OnnxExportError(f"layer {where} ({m!r}) gets input of shape {shape}; it needs "
                              f"(N, {m.in_features})")
    inputs = [x, graph.constant(f"{where}.weight", m.weight.data)]
    if m.bias is not None:
        inputs.append(graph.constant(f"{where}.bias", m.bias.data))
    return graph.node("Gemm", inputs, f"{where}.gemm", transB=1), (shape[0], m.out_features)


def _residual(graph, m, x, shape, where):
    y, y_shape = _layer(graph, m.body, x, shape, f"{where}.body")
    s, s_shape = _layer(graph, m.shortcut, x, shape, f"{where}.shortcut")
    if y_shape[1:] != s_shape[1:]:
        raise OnnxExportError(f"layer {where} (Residual): the body's output has shape "
                              f"{y_shape} but the shortcut's has {s_shape}; they must match")
    return graph.node("Add", [y, s], f"{where}.add"), y_shape


def _sequential(graph, m, x, shape, where):
    for name, child in m.named_children():
        x, shape = _layer(graph, child, x, shape, f"{where}.{name}" if where else name)
    return x, shape


# gpucnn.nn's layers by class name: this module sits below nn (which calls it from
# Module.to_onnx), so it knows the layers by name and checks that they are nn's own
_EXPORTERS = {
    "Sequential": _sequential, "Residual": _residual, "Conv2D": _conv, "MaxPool2D": _max_pool,
    "AvgPool2D": _avg_pool, "BatchNorm2D": _batch_norm, "Linear": _linear,
    "ReLU": lambda graph, m, x, shape, where: (graph.node("Relu", [x], f"{where}.relu"), shape),
    "Flatten": lambda graph, m, x, shape, where: (
        graph.node("Flatten", [x], f"{where}.flatten", axis=1),
        (shape[0], math.prod(shape[1:]))),
    "GlobalAvgPool2D": lambda graph, m, x, shape, where: (
        graph.node("Flatten", [graph.node("GlobalAveragePool", [x], f"{where}.gap")],
                   f"{where}.flatten", axis=1), tuple(shape[:2])),
    "Dropout": lambda graph, m, x, shape, where: (x, shape),
    "Identity": lambda graph, m, x, shape, where: (x, shape),
}


def _layer(graph, m, x, shape, where):
    """(output value name, output shape) of module m applied to value x."""
    kind = type(m).__name__
    exporter = _EXPORTERS.get(kind) if type(m).__module__.startswith("gpucnn.nn.") else None
    if exporter is None:
        known = ", ".join(sorted(_EXPORTERS))
        raise OnnxExportError(f"layer {where or '(the model)'} ({type(m).__name__}) has no ONNX "
                              f"form; gpucnn exports {known}")
    if len(shape) != 4 and kind in ("Conv2D", "MaxPool2D", "AvgPool2D", "BatchNorm2D",
                                    "GlobalAvgPool2D"):
        raise OnnxExportError(f"layer {where} ({type(m).__name__}) gets input of shape {shape}; "
                              "it needs (N, C, H, W)")
    try:
        return exporter(graph, m, x, shape, where)
    except OnnxExportError:
        raise
    except ValueError as e:  # a geometry check: the input is too small for this layer
        raise OnnxExportError(f"layer {where} ({type(m).__name__}): {e}") from None


def _check_input_shape(input_shape):
    ok = isinstance(input_shape, (tuple, list)) and len(input_shape) == 3 and \
        all(validate.is_int(v) and v > 0 for v in input_shape)
    if not ok:
        raise OnnxExportError(f"input_shape must be one sample's (C, H, W), three positive "
                              f"ints without the batch axis, e.g. (1, 28, 28), got {input_shape!r}")
    return tuple(int(v) for v in input_shape)


def _normalization(graph, x, normalization, channels):
    """Nodes computing (x - mean) / std; mean and std a number or one per channel."""
    if not isinstance(normalization, dict) or set(normalization) != {"mean", "std"}:
        raise OnnxExportError(f"normalization must be None or a dict with keys 'mean' and "
                              f"'std', got {normalization!r}")
    values = {}
    for key in ("mean", "std"):
        try:
            v = numpy.asarray(normalization[key], dtype=numpy.float64).reshape(-1)
        except (TypeError, ValueError):
            v = numpy.full(0, numpy.nan)  # not numbers: refused below
        if v.size not in (1, channels) or not numpy.isfinite(v).all() or \
                (key == "std" and (v <= 0).any()):
            need = ", all positive" if key == "std" else ""
            raise OnnxExportError(f"normalization[{key!r}] must be one finite number or "
                                  f"{channels} (one per channel){need}, got "
                                  f"{normalization[key]!r}")
        values[key] = v.reshape(1, -1, 1, 1) if v.size > 1 else v.reshape(())
    x = graph.node("Sub", [x, graph.constant("mean", values["mean"])], "centred")
    return graph.node("Div", [x, graph.constant("std", values["std"])], "normalized"), \
        {k: v.reshape(-1).tolist() for k, v in values.items()}


def build(model, input_shape, normalization=None, classes=None):
    """The onnx.ModelProto of model's eval forward, checked by onnx.checker."""
    onnx = _onnx()
    from . import __version__
    input_shape = _check_input_shape(input_shape)
    graph = _Graph(onnx)
    x = "input"
    meta = {"input_shape": list(input_shape), "normalization": None}
    if normalization is not None:
        x, stated = _normalization(graph, x, normalization, input_shape[0])
        meta["normalization"] = dict(stated, in_graph=True)
    y, out_shape = _layer(graph, model, x, (1,) + input_shape, "")  # batch 1 stands for any
    # a fixed output name, also for a model that is all Identity
    graph.nodes.append(onnx.helper.make_node("Identity", [y], ["output"], name="output"))
    if classes is not None:
        meta["classes"] = [int(c) if validate.is_int(c) else str(c) for c in classes]
    h = onnx.helper
    value = lambda name, shape: h.make_tensor_value_info(  # noqa: E731
        name, onnx.TensorProto.FLOAT, ["batch"] + [int(d) for d in shape[1:]])
    proto = h.make_model(
        h.make_graph(graph.nodes, "gpucnn", [value("input", (1,) + input_shape)],
                     [value("output", out_shape)], graph.constants),
        opset_imports=[h.make_opsetid("", OPSET)], producer_name="gpucnn",
        producer_version=__version__)
    proto.ir_version = IR_VERSION
    h.set_model_props(proto, {k: json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model, path, input_shape=None, normalization=None, classes=None):
    """Write model's eval-mode forward to path as ONNX (opset 17); returns path.

    input_shape: one sample's (C, H, W). normalization: None or {'mean': m, 'std': s}
    (numbers or one per channel), applied as the graph's first nodes and stated in
    its metadata. classes: the class names, stored in the metadata ('classes', a
    JSON list). Each of the three left None is taken from the model's attribute of
    that name where it has one (gpucnn.load sets them from the checkpoint), so
    ``export(gpucnn.load(checkpoint), path)`` exports a trained model as it was
    trained. A layer without an ONNX form is an OnnxExportError naming it.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise OnnxExportError(f"path must be a file path (str or os.PathLike), got "
                              f"{type(path).__name__}")
    given = dict(input_shape=input_shape, normalization=normalization, classes=classes)
    given = {k: getattr(model, k, None) if v is None else v for k, v in given.items()}
    proto = build(model, **given)
    interop.write_atomically(path, lambda f: f.write(proto.SerializeToString()), OnnxExportError)
    return path
