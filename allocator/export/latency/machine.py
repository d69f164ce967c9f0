"""What a latency table's timings depend on besides the kernels: the machine, the runtime's
version and the model's content. Together they key a stored table, so a table is reused only
where its timings still hold.

Imports torch and onnxruntime.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from allocator.cache import digest
from allocator.zoo.base import LoadedModel

ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
)
"""The instruction sets that decide which low-bit and float kernels a runtime can use."""


TIMING_METHOD = "layer-graphs-open-axes; rest per activation width; integer conv"
"""How layers are timed (`allocator.export.latency.layer_graph`); part of the key, so that a
table measured the way an older bitplan timed layers is measured anew, not reused."""


def machine(runtime: str, threads: int | None = None) -> dict[str, Any]:
    """What decides the timings besides the model: CPU model, cores, the ISA flags that select
    kernels, intra-op threads, the GPU for torch-cuda, and how layers are timed. Its sha256 is
    part of a table's key."""
    flags: set[str] = set()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Hardware") and cpu in ("", platform.machine()):
                cpu = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    found: dict[str, Any] = {
        "cpu": cpu,
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "flags": sorted(flag for flag in ISA_FLAGS if flag in flags),
        "threads": threads or torch.get_num_threads(),
        "timing": TIMING_METHOD,
    }
    if runtime == "torch-cuda":
        found["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return found


def runtime_version(runtime: str) -> str:
    """The library (and CUDA) version that ran the kernels: a new one may time them anew."""
    if runtime == "onnxruntime-cpu":
        return f"onnxruntime {ort.__version__}"
    cuda = f" cuda {torch.version.cuda}" if runtime == "torch-cuda" else ""
    return f"torch {torch.__version__}{cuda}"


def model_digest(model: LoadedModel) -> str:
    """The model's content key (architecture class and every parameter and buffer)."""
    return digest("latency-model", model.module)
