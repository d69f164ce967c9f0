"""A packed artifact as an ONNX model in the standard QDQ layout.

Weights: each planned layer's weight is `DequantizeLinear(codes, scale, zero_point, axis)`
feeding the layer's own Conv / Gemm / MatMul, with per-output-channel float32 scales (the
artifact's float16 scales, widened exactly) and zero points 0 (bitplan's weight grid is
symmetric). The codes are the artifact's own integers, copied from `read_packed`, never a
re-quantization of float weights: INT4 initializers for layers of at most 4 bits (opset 21's
DequantizeLinear takes INT4 and ONNX Runtime's CPU kernel runs it), INT8 for 5 to 8 bits. A
16-bit layer is a FLOAT16 initializer cast to float. Linear weights are stored transposed,
(in, out) with `axis=1`, so DequantizeLinear feeds MatMul / Gemm directly as ONNX Runtime's own
quantizer lays them out.

Activations: at every site the plan quantizes, `QuantizeLinear -> DequantizeLinear` with the
plan's per-tensor scale and zero point (min-max, percentile and mse quantizers). Activations
stay UINT8 even at 4 bits, because integer kernels (QLinearConv, QLinearMatMul, MatMulInteger)
take 8-bit activations; a width below 8 bits clips first (`Clip`), so the codes a runtime sees
are exactly the plan's 2^b levels. Refused, with the site and the reason: softmax quantizers
that are not uniform (log2, log-sqrt2, shift-uniform-log2, tan: QuantizeLinear has no form for
them), and RepQ-ViT's per-channel ranges (`channel`, `channel-clip`): per-axis activation QDQ
is valid ONNX, but ONNX Runtime fuses it into MatMulIntegerToFloat, which then fails at run
time on per-channel zero points (bitplan runs these quantizers unfolded; folding them into the
LayerNorm and the next layer's weights would change the packed codes).

How: the quantized model (`allocator.apply.load_packed`) is traced by the TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`) with each planned weight and each quantized activation
routed through a marker op (`bitplan::Weight`, `bitplan::Activation`) whose eager forward is
bitplan's own computation; the markers are then replaced by the QDQ nodes above with `onnx`.
The tracer knows opsets up to 20; INT4 needs 21, whose changes to the ops it emits only add
types, so the opset is raised after tracing. The plan, the job id and the storage of every
layer and site are in the model's `metadata_props`.

The package: `tracing` (the exporter's and the runtime's view of a model), `weights` and
`activations` (each marker and its QDQ nodes), `graph` (graph edits and the metadata), `export`
(`export_onnx`, which orders the steps). What is imported from here is what runs, checks or
stamps an export; the latency tables reuse the weight and activation nodes from their modules.

Imports torch and onnx; never anything from the service, database or worker layers.
"""

from allocator.export.onnx_qdq.activations import (
    SiteStorage,
    activation_codes,
    check_exportable,
    plan_sites,
    qdq_params,
)
from allocator.export.onnx_qdq.export import OnnxExport, export_onnx
from allocator.export.onnx_qdq.graph import read_metadata, stamp
from allocator.export.onnx_qdq.tracing import OUTPUT_NAME, feeds, replace_module
from allocator.export.onnx_qdq.weights import WeightStorage, layer_outputs

__all__ = [
    "OUTPUT_NAME",
    "OnnxExport",
    "SiteStorage",
    "WeightStorage",
    "activation_codes",
    "check_exportable",
    "export_onnx",
    "feeds",
    "layer_outputs",
    "plan_sites",
    "qdq_params",
    "read_metadata",
    "replace_module",
    "stamp",
]
