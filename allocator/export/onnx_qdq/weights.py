"""Planned weights as DequantizeLinear of the artifact's own codes.

A marker parametrization makes each planned weight a `bitplan::Weight` node in the traced
graph (and, in eager mode, the dequantized weight `apply` computes); the rewrite then turns it
into INT4 / INT8 codes with per-channel scales, or a FLOAT16 weight cast to float, in the layout
ONNX Runtime's own quantizer uses. The latency tables build their one-layer graphs with the
same nodes, so they time the kernels an export runs.

Imports torch and onnx.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn
from torch.nn.utils import parametrize

from allocator.apply import PackedArtifact
from allocator.export.onnx_qdq.graph import (
    MARKER_DOMAIN,
    attribute,
    consumers,
    ints,
    marker_nodes,
    model_props,
    swap,
)
from allocator.quant.weight import FLOAT_BITS

INT4_MAX_BITS = 4
"""Codes of at most this many bits are stored as INT4, wider ones as INT8."""


@dataclass(frozen=True)
class WeightStorage:
    """How one planned layer's weight is stored in the ONNX model."""

    initializer: str
    """The codes (or the float16 weight of a 16-bit layer)."""
    type: str
    """"INT4", "INT8" or "FLOAT16"."""
    bits: int
    axis: int | None
    """The DequantizeLinear axis of the per-channel scales; None for FLOAT16."""
    transposed: bool
    """True for a Linear weight stored (in, out), as MatMul reads it."""


class WeightMarker(nn.Module):
    """A parametrization that makes a planned weight `bitplan::Weight(layer)` in the traced
    graph, and its dequantized value (what `apply` computes) in eager mode."""

    def __init__(self, layer: str, quantized: Any) -> None:
        super().__init__()
        self.layer = layer
        self.value = quantized.dequantize()

    def forward(self, original: Tensor) -> Tensor:
        value, layer = self.value, self.layer

        class Weight(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, w: Tensor) -> Tensor:
                return value.to(w.device)

            @staticmethod
            def symbolic(g: Any, w: Any) -> Any:
                out = g.op(f"{MARKER_DOMAIN}::Weight", w, layer_s=layer)
                return out.setType(w.type())

        return Weight.apply(original)


def mark_weights(layers: Mapping[str, nn.Module], packed: PackedArtifact) -> None:
    """Put a `WeightMarker` on the weight of every layer the plan quantizes."""
    for name in packed.plan.layers:
        parametrize.register_parametrization(
            layers[name], "weight", WeightMarker(name, packed.codes[name]), unsafe=True
        )


def replace_weights(proto: onnx.ModelProto, packed: PackedArtifact) -> dict[str, WeightStorage]:
    """Each `bitplan::Weight` marker becomes DequantizeLinear of the artifact's codes (or a
    Cast of its float16 weight), a following Transpose folded into a transposed layout."""
    graph = proto.graph
    users_of = consumers(graph)
    storage = {}
    for node in marker_nodes(graph, "Weight"):
        layer = attribute(node, "layer")
        quantized = packed.codes[layer]
        users = users_of.get(node.output[0], [])
        output = node.output[0]
        transposed = (
            len(users) == 1
            and users[0].op_type == "Transpose"
            and quantized.codes.dim() == 2
            and list(ints(users[0], "perm")) == [1, 0]
        )
        if transposed:
            output = users[0].output[0]
            graph.node.remove(users[0])
        new_nodes, inits, storage[layer] = weight_nodes(layer, quantized, transposed, output)
        swap(graph, node, new_nodes)
        graph.initializer.extend(inits)
    return storage


def weight_nodes(
    layer: str, quantized: Any, transposed: bool, output: str
) -> tuple[list[onnx.NodeProto], list[TensorProto], WeightStorage]:
    """The nodes and initializers that compute `quantized`'s dequantized weight into `output`,
    and how they store it."""
    codes = quantized.codes.detach().cpu()
    if transposed:
        codes = codes.t().contiguous()
    if quantized.bits == FLOAT_BITS:
        name = f"{layer}.weight_float16"
        init = numpy_helper.from_array(codes.numpy().astype(np.float16), name)
        cast = helper.make_node("Cast", [name], [output], to=TensorProto.FLOAT)
        return [cast], [init], WeightStorage(name, "FLOAT16", FLOAT_BITS, None, transposed)
    axis = 1 if transposed else 0
    channels = codes.shape[axis]
    kind = TensorProto.INT4 if quantized.bits <= INT4_MAX_BITS else TensorProto.INT8
    type_name = "INT4" if kind == TensorProto.INT4 else "INT8"
    names = [f"{layer}.weight_codes", f"{layer}.weight_scale", f"{layer}.weight_zero_point"]
    inits = [
        _integer_tensor(names[0], kind, codes.numpy()),
        numpy_helper.from_array(quantized.scale.float().cpu().numpy(), names[1]),
        _integer_tensor(names[2], kind, np.zeros(channels, dtype=np.int8)),
    ]
    node = helper.make_node("DequantizeLinear", names, [output], axis=axis)
    return [node], inits, WeightStorage(names[0], type_name, quantized.bits, axis, transposed)


def _integer_tensor(name: str, kind: int, values: np.ndarray) -> TensorProto:
    """An INT4 or INT8 initializer holding `values` exactly (INT4 packed two to a byte)."""
    if kind == TensorProto.INT4:
        return helper.make_tensor(name, kind, values.shape, values.astype(np.int64).ravel())
    return numpy_helper.from_array(values.astype(np.int8), name)


def layer_outputs(proto: onnx.ModelProto) -> dict[str, str]:
    """Each planned layer's output tensor in `proto` (the Conv / Gemm output, or MatMul's
    after its bias Add), by layer name, read off the weights in its metadata: what a parity
    check exposes to find where outputs first diverge."""
    props = model_props(proto)
    weights = json.loads(props["bitplan.weights"])
    # A layer with its BatchNormalization folded in computes both: not bitplan's layer output.
    folded = set(json.loads(props.get("bitplan.integer_conv", "{}")).get("folded_batchnorm", []))
    producers = {out: node for node in proto.graph.node for out in node.output}
    users_of = consumers(proto.graph)
    found = {}
    for layer, storage in weights.items():
        if layer in folded:
            continue
        weight_node = next(
            node for node in proto.graph.node if storage["initializer"] in node.input
        )
        users = users_of.get(weight_node.output[0], [])
        if len(users) != 1:
            continue
        op = users[0]
        output = op.output[0]
        after = users_of.get(output, [])
        if op.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "Add":
            other = next(name for name in after[0].input if name != output)
            if other not in producers or producers[other].op_type == "Constant":
                output = after[0].output[0]
        found[layer] = output
    return found
