"""Rewrites that let ONNX Runtime run a quantized convolution as one integer kernel.

ONNX Runtime fuses `DequantizeLinear(x) -> Conv(DequantizeLinear(w), bias) -> QuantizeLinear`
into QLinearConv only when the Conv's output goes straight to the next QuantizeLinear and its
bias is INT32 on the grid input scale x weight scale. A traced CNN has neither: eval-mode
BatchNormalization follows every Conv (the tracer folds it only into a constant weight, and a
quantized weight is a DequantizeLinear output), and the bias is float. So an exported W8A8
EfficientNet-Lite1 ran dequantized float Conv + BatchNormalization at several times FP32's
latency; with these two rewrites its convolutions become QLinearConv and it runs below FP32
(`python bench/export.py`, docs/benchmarks.md).

- `fold_batchnorms`: a BatchNormalization that is its Conv's only reader, where the Conv's
  input is an 8-bit site, is folded into the Conv: the weight's per-channel scales times
  gamma / sqrt(var + eps) (the integer codes do not change, so the layer stays on its planned
  grid; a negative gamma makes that channel's scale negative, which DequantizeLinear and
  QLinearConv take) and the bias shifted to match. Exact in real arithmetic; float rounding
  differs from bitplan's Conv-then-BatchNorm by ulps. Weight-only exports keep the artifact's
  scales as they are.
- `integer_biases`: a Conv whose input is an 8-bit activation site (through a Pad, for
  TensorFlow-style "same" padding) gets its bias as INT32 codes round(b / (s_x s_w)) through
  DequantizeLinear, the layout ONNX Runtime's own WeightBiasQuantization writes. Only at 8
  bits: below, s_x is coarse and the rounded bias moved outputs by 1.6 % of their range on the
  tests' CNN (why that rewrite is switched off in `allocator.export.runtime`).

The integer kernels round their int32 sums to the next site's codes their own way, so codes
move by one step at more boundaries than in float kernels. `allocator.export.job` checks the
rewritten file like any other and, when it misses the check, exports again without these
rewrites (`ExportCheck.integer_conv` says which file was kept and why).

Imports onnx and numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from allocator.export.onnx_qdq.graph import consumers

INT32_LIMIT = 2**31 - 1
ACTIVATION_BITS = 8
"""The input width at which a Conv's bias is stored as INT32 codes."""


def fold_batchnorms(
    proto: onnx.ModelProto, layers: Mapping[str, str], input_bits: Mapping[str, int]
) -> list[str]:
    """Fold the BatchNormalization after each Conv whose input site is 8-bit (where an integer
    kernel can follow) into its quantized weight's scales and its bias; `layers` maps a
    weight's codes initializer to its layer, `input_bits` each quantized input site's width
    by layer. The layers folded."""
    graph = proto.graph
    values = _values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers = consumers(graph)
    outputs = {output.name for output in graph.output}
    folded, dropped = [], []
    for norm in [node for node in graph.node if node.op_type == "BatchNormalization"]:
        if norm.output[0] in outputs:
            continue
        conv = producer.get(norm.input[0])
        if conv is None or conv.op_type != "Conv" or len(readers[conv.output[0]]) != 1:
            continue
        weight = _eight_bit_weight(conv, producer, layers, input_bits)
        if weight is None:
            continue
        gamma, beta, mean, var = (values.get(name) for name in norm.input[1:5])
        if any(v is None for v in (gamma, beta, mean, var)) or weight.input[1] not in values:
            continue
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + epsilon)  # type: ignore[operator]
        if not (factor != 0).all():
            continue
        bias = values.get(conv.input[2]) if len(conv.input) > 2 else np.zeros_like(mean)
        if bias is None:
            continue
        layer = layers[weight.input[0]]
        scale = values[weight.input[1]]
        _set(graph, values, weight.input[1], (scale * factor).astype(np.float32))
        # A new name: the old bias may be a Constant node's output, or read elsewhere.
        folded_bias = f"{layer}.bias_folded"
        _set(graph, values, folded_bias, ((bias - mean) * factor + beta).astype(np.float32))
        conv.input[2:] = [folded_bias]
        _rename(graph, norm.output[0], conv.output[0])
        dropped.append(norm)
        folded.append(layer)
    for norm in dropped:
        graph.node.remove(norm)
    return folded


def integer_biases(
    proto: onnx.ModelProto, layers: Mapping[str, str], input_bits: Mapping[str, int]
) -> list[str]:
    """Store the float bias of each Conv whose input site is 8-bit as INT32 codes on
    s_x x s_w; `input_bits` gives each quantized input site's width by layer. The layers
    rewritten."""
    graph = proto.graph
    values = _values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    done = []
    for conv in [node for node in graph.node if node.op_type == "Conv" and len(node.input) > 2]:
        weight = _eight_bit_weight(conv, producer, layers, input_bits)
        source = producer.get(conv.input[0])
        if source is not None and source.op_type == "Pad":  # TF-style "same" padding
            source = producer.get(source.input[0])
        if weight is None or source is None:
            continue
        layer = layers[weight.input[0]]
        if source.op_type != "DequantizeLinear" or source.input[1] not in values:
            continue
        bias, input_scale = values.get(conv.input[2]), values[source.input[1]]
        if bias is None or input_scale.size != 1:
            continue
        scale = (values[weight.input[1]] * input_scale.reshape(())).astype(np.float32)
        divisor = np.where(scale == 0, 1.0, scale)
        codes = np.clip(np.round(bias / divisor), -INT32_LIMIT, INT32_LIMIT).astype(np.int32)
        prefix = f"{layer}.bias"
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, f"{prefix}_codes"),
                numpy_helper.from_array(scale, f"{prefix}_scale"),
            ]
        )
        node = helper.make_node(
            "DequantizeLinear",
            [f"{prefix}_codes", f"{prefix}_scale"],
            [f"{prefix}_dequantized"],
            axis=0,
        )
        graph.node.insert(list(graph.node).index(conv), node)
        conv.input[2] = f"{prefix}_dequantized"
        done.append(layer)
    return done


def _eight_bit_weight(
    conv: onnx.NodeProto,
    producer: Mapping[str, onnx.NodeProto],
    layers: Mapping[str, str],
    input_bits: Mapping[str, int],
) -> onnx.NodeProto | None:
    """The DequantizeLinear of a planned layer's codes feeding `conv`, when the layer's input
    site is 8-bit (None otherwise): the convolutions these rewrites are for."""
    weight = producer.get(conv.input[1])
    if weight is None or weight.op_type != "DequantizeLinear" or weight.input[0] not in layers:
        return None
    return weight if input_bits.get(layers[weight.input[0]]) == ACTIVATION_BITS else None


def _values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every initializer, Constant output and Identity of one by name, as arrays (the tracer
    writes a tensor equal to another, a BatchNorm's unit running_var beside its unit gamma, as
    an Identity of it)."""
    found = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in found:
            found[node.output[0]] = found[node.input[0]]
    return found


def _set(
    graph: onnx.GraphProto, values: dict[str, np.ndarray], name: str, value: np.ndarray
) -> None:
    """Replace (or add) the initializer `name`."""
    values[name] = value
    for init in graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(value, name))
            return
    graph.initializer.append(numpy_helper.from_array(value, name))


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Let every reader of tensor `old` read `new` instead."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
