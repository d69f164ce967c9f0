"""How bitplan opens ONNX Runtime: the CPU session every export check and timing uses.

Two of ONNX Runtime's default graph rewrites compute a different model from the one bitplan
evaluated (see `allocator.export.parity`); `SESSION_CONFIG` and `DISABLED_OPTIMIZERS` switch
them off, and an exported model's metadata says so (`session_metadata`), so whoever runs it
opens it the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import onnxruntime as ort
import torch
from torch import Tensor

from allocator.export.onnx_qdq import OUTPUT_NAME, feeds
from allocator.zoo.base import Inputs

SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
"""Session config entries the parity is measured with (float accumulation in MatMulNBits)."""
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
"""Graph rewrites switched off for parity (float biases stay float)."""
PROVIDER = "CPUExecutionProvider"


def runtime_name() -> str:
    return f"onnxruntime {ort.__version__} {PROVIDER}"


def session(
    path: str | Path, defaults: bool = False, threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with `SESSION_CONFIG` and `DISABLED_OPTIMIZERS` (or, with
    `defaults`, as ONNX Runtime comes) and as many intra-op threads as torch uses, so both
    sides of a comparison or a timing get the same."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if defaults:
        return ort.InferenceSession(str(path), options, providers=[PROVIDER])
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(
        str(path), options, providers=[PROVIDER], disabled_optimizers=list(DISABLED_OPTIMIZERS)
    )


def session_metadata() -> dict[str, str]:
    """How to open the exported model so that it computes what parity measured."""
    settings = {"config": SESSION_CONFIG, "disabled_optimizers": list(DISABLED_OPTIMIZERS)}
    return {"bitplan.onnxruntime_session": json.dumps(settings)}


def runtime_forward(
    runtime: ort.InferenceSession, names: Sequence[str]
) -> Callable[[Inputs], Tensor]:
    """The exported model as a function of a model-ready batch, like `LoadedModel.__call__`."""

    def forward(batch: Inputs) -> Tensor:
        return torch.from_numpy(runtime.run([OUTPUT_NAME], feeds(names, batch))[0])

    return forward
