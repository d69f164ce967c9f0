"""Measure a latency table: each weight layer alone, at each candidate (weight width, activation
width or float), on this machine's runtime, with warm-up, repeats and the median.

What is timed, per runtime:

- `onnxruntime-cpu`: a one-layer ONNX model with the QDQ pattern `allocator.export.onnx_qdq`
  writes for a plan (its own `weight_nodes` and `qdq_nodes`): `DequantizeLinear` of INT4
  codes (2-4 bits) or INT8 codes (5-8 bits) with per-channel scales, a FLOAT16 weight cast to
  float (16 bits) or the float weight (FP32), feeding the layer's Conv or MatMul + Add, with
  `[Clip ->] QuantizeLinear -> DequantizeLinear` on its input when the activation is quantized
  (scale and zero point from the input's range, as a min-max quantizer sets them). Sessions
  are opened as parity opens them (`allocator.export.runtime.session`), so the kernels are the
  ones the checked export runs. Widths that give the same graph (2, 3 and 4 bits are all
  INT4; 5 to 8 all INT8; 4 and 6-bit activations are both clipped UINT8) run the same kernel
  and share one measurement; `settings["variants"]` says which. Each entry is net of the
  runtime's per-call overhead (an Identity graph on the same input, timed alike), which is
  paid once per model run and so belongs to `rest_ms`.
- `torch-cpu` / `torch-cuda`: the layer as bitplan's quantized model runs it: dequantized float
  weights (torch has no low-bit kernels, so every weight width runs the same float kernel and
  the table is flat in weight width: the table says so in `flat` and `notes`), with the
  input fake-quantized when the activation is.

`rest_ms` is the FP32 model timed end to end (exported to ONNX without QDQ, or the torch
module) less the sum of its layers' FP32 entries: pooling, additions, normalisation and
activation functions, and the call overhead. With quantized activations that rest changes
(each site's QDQ, and integer kernels between quantized sites that no layer holds, such as
MiniLM's attention matmuls), so for each quantized activation width the model with INT8
weights and every site at that width is timed end to end too, and `act_rest_ms` keeps its
rest; a layer's entry at that width carries its share of the difference
(`LatencyTable.ms`). `end_to_end_ms` times a whole exported model the same way, for the
predicted-against-measured figures of a job's report.

Timings are what this machine did, nothing more: on a CPU without fast int8 or int4 paths,
ONNX Runtime's QDQ kernels can be slower than float, and the table will say so.

The package: `machine` (what keys a table besides the model), `timing` (the clock, the inputs
and whole-model timings), `layer_graph` (a layer alone as ONNX), `layer_timer` (a layer timed
at each candidate), `table` (`measure_table`).

Imports torch, onnx and onnxruntime; never anything from the service, database or worker layers.
"""

from allocator.export.latency.machine import machine, model_digest, runtime_version
from allocator.export.latency.table import measure_table
from allocator.export.latency.timing import (
    Quantized,
    end_to_end_ms,
    example_input,
    export_float,
    export_ms,
)

__all__ = [
    "Quantized",
    "end_to_end_ms",
    "example_input",
    "export_float",
    "export_ms",
    "machine",
    "measure_table",
    "model_digest",
    "runtime_version",
]
