"""Exports of a finished job's plan to runtimes, each checked in that runtime before it is
handed out: `onnx_qdq` writes the ONNX QDQ model, `parity` runs it in ONNX Runtime against
bitplan's own quantized model, `job` does both for a job's artifact."""
