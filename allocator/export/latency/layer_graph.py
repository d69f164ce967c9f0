"""One weight layer alone as an ONNX model, built from the export's own weight and activation
QDQ nodes, so the kernel ONNX Runtime picks for it is the one it picks for that layer in an
exported plan; and the Identity model that measures the runtime's per-call overhead.

The input's axes that the whole exported model leaves open (batch, and sequence for token
models: `allocator.export.onnx_qdq.tracing.dynamic_axes`) stay open here too, because ONNX
Runtime picks different kernels for them: with a static shape it rewrites MatMul + Add into
Reshape + Gemm, and a Gemm between DequantizeLinear nodes only fuses into an integer kernel
when a QuantizeLinear follows it, so an 8-bit layer of MiniLM ran dequantized weights and a
float Gemm alone (1.16 ms) but MatMulIntegerToFloat in the model (0.038 ms), and the table
priced 8-bit activations at 8x FP32 while the whole W8A8 model ran in 0.55x FP32's time.

A convolution with an 8-bit input and INT8 weights is exported for QLinearConv
(`allocator.export.onnx_qdq.integer_conv`): here it gets the same INT32 bias and 8-bit QDQ on
its output, as the next site gives it in the model, so it is timed as that kernel.

Imports torch and onnx.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from allocator.export.onnx_qdq.activations import qdq_nodes, qdq_params
from allocator.export.onnx_qdq.export import OPSET
from allocator.export.onnx_qdq.integer_conv import ACTIVATION_BITS, integer_biases
from allocator.export.onnx_qdq.weights import INT4_MAX_BITS, weight_nodes
from allocator.latency_table import FLOAT_WIDTH
from allocator.quant.activation import calibrate
from allocator.quant.weight import FLOAT_BITS, quantize_weight

INPUT = "x"
OUTPUT = "y"


def layer_graph(
    name: str,
    module: nn.Module,
    x: Tensor,
    weight_bits: int,
    act_bits: int,
    open_axes: Sequence[int] = (),
) -> onnx.ModelProto:
    """`module` (a Linear or Conv2d) on an input shaped as `x`, `open_axes` of it left symbolic
    as the exported model leaves them: its weight at `weight_bits` (FLOAT_WIDTH: the float
    weight), its input through QDQ at `act_bits` unless float, with scale and zero point from
    `x`'s range as a min-max quantizer sets them."""
    linear = isinstance(module, nn.Linear)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    source = INPUT
    if act_bits < FLOAT_WIDTH:
        quantizer = calibrate("minmax", x, act_bits)
        nodes, inits = qdq_nodes(f"{name}.act", INPUT, "x_dq", qdq_params(quantizer))
        source = "x_dq"
    weight = module.weight.detach().float()
    if weight_bits >= FLOAT_WIDTH:
        value = weight.t().contiguous() if linear else weight
        inits.append(numpy_helper.from_array(value.numpy(), "w"))
    else:
        quantized = quantize_weight(weight, _stored_width(weight_bits))
        w_nodes, w_inits, _ = weight_nodes(name, quantized, linear, "w")
        nodes += w_nodes
        inits += w_inits
    bias = module.bias
    inputs = [source, "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.detach().float().numpy(), "b"))
    if linear:
        out = "mm" if bias is not None else OUTPUT
        nodes.append(helper.make_node("MatMul", [source, "w"], [out]))
        if bias is not None:
            nodes.append(helper.make_node("Add", ["mm", "b"], [OUTPUT]))
    else:
        nodes.append(
            helper.make_node(
                "Conv", [*inputs, *(["b"] if bias is not None else [])], [OUTPUT], **_conv(module)
            )
        )
    integer = (
        not linear
        and act_bits == ACTIVATION_BITS
        and INT4_MAX_BITS < _stored_width(weight_bits) < FLOAT_BITS
    )
    if integer:
        _requantized_output(nodes, inits, name, module, x)
    shape = [f"axis{i}" if i in open_axes else size for i, size in enumerate(x.shape)]
    x_info = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, shape)
    y_info = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, None)
    proto = _model(helper.make_graph(nodes, name, [x_info], [y_info], initializer=inits))
    if integer:
        integer_biases(proto, {f"{name}.weight_codes": name}, {name: ACTIVATION_BITS})
    return proto


def _requantized_output(
    nodes: list[onnx.NodeProto], inits: list[TensorProto], name: str, module: nn.Module, x: Tensor
) -> None:
    """The Conv's output through 8-bit QDQ, as the next site quantizes it in an exported plan
    (with its INT32 bias, `allocator.export.onnx_qdq.integer_conv`): ONNX Runtime then runs
    the layer as QLinearConv, as in the whole model."""
    with torch.no_grad():
        y = module(x)
    for node in nodes:
        node.output[:] = ["y_float" if out == OUTPUT else out for out in node.output]
    quantizer = calibrate("minmax", y, ACTIVATION_BITS)
    out_nodes, out_inits = qdq_nodes(f"{name}.out", "y_float", OUTPUT, qdq_params(quantizer))
    nodes += out_nodes
    inits += out_inits


def identity_graph(shape: Sequence[int]) -> onnx.ModelProto:
    """An Identity on an input of `shape`: all a run costs besides its kernels."""
    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, list(shape))
    return _model(
        helper.make_graph([helper.make_node("Identity", [INPUT], [OUTPUT])], "id", [x], [y])
    )


def _conv(module: nn.Module) -> dict[str, Any]:
    """The Conv attributes of an nn.Conv2d (its own padding rule; 'same' as SAME_UPPER)."""
    attrs: dict[str, Any] = {
        "kernel_shape": list(module.kernel_size),
        "strides": list(module.stride),
        "dilations": list(module.dilation),
        "group": module.groups,
    }
    if module.padding == "same":
        attrs["auto_pad"] = "SAME_UPPER"
    elif module.padding == "valid":
        attrs["pads"] = [0, 0, 0, 0]
    else:
        top, left = module.padding
        attrs["pads"] = [top, left, top, left]
    return attrs


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """`graph` at the export's opset, with an IR version the runtime reads."""
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = 10
    return proto


def _stored_width(bits: int) -> int:
    """A width with the same ONNX storage that the weight quantizer supports (7 bits is INT8
    like 8; the codes' values do not change the kernel)."""
    if bits >= FLOAT_BITS:
        return FLOAT_BITS
    return bits if bits != 7 else 8
