"""How anything is timed, a layer or a whole model: warm-up calls, then the median of repeats,
on a batch of the shape the table is for. A job's end-to-end figures use the same clock as
its table, so predicted and measured latencies compare.

Imports torch and onnxruntime.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from allocator.errors import BadSpec
from allocator.export.onnx_qdq.tracing import Traced, feeds, positional_inputs, trace
from allocator.export.runtime import session
from allocator.plan import BitPlan
from allocator.zoo.base import Inputs, LoadedModel

WARMUP = 10
REPEATS = 50


def example_input(model: LoadedModel, shape: Sequence[int], seed: int = 0) -> Inputs:
    """A model-ready batch of `shape`: normal noise for an image model (N, C, H, W); token ids
    (N, T) for a causal LM; sentences of about T tokens for a sentence model."""
    generator = torch.Generator().manual_seed(seed)
    if model.input_kind == "image":
        if len(shape) != 4:
            raise BadSpec(f"{model.ref} takes images: give an input shape N,C,H,W, got {shape}")
        return torch.randn(tuple(shape), generator=generator)
    if len(shape) != 2:
        raise BadSpec(f"{model.ref} takes tokens: give an input shape N,T, got {shape}")
    batch, tokens = shape
    if model.encode is not None:
        return model.prepare_windows(
            torch.randint(0, 1000, (batch, tokens), generator=generator).numpy()
        )
    return model.prepare_text([" ".join(["word"] * max(tokens - 2, 1))] * batch)


def median_ms(
    call: Callable[[], object],
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    sync: Callable[[], None] = lambda: None,
) -> float:
    """The median wall time of `call` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        sync()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times)


def onnx_timer(path: Path, feed: Mapping[str, np.ndarray], threads: int) -> Callable[[], object]:
    """One run of the ONNX file at `path` on `feed`, in a session opened as parity opens it,
    so the kernels timed are the ones the checked export runs."""
    runtime = session(path, threads=threads)
    return lambda: runtime.run(None, dict(feed))


def end_to_end_ms(
    runtime: str,
    model: LoadedModel | Path,
    batch: Inputs,
    *,
    names: Sequence[str] = ("input",),
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    threads: int | None = None,
    activations: Callable[[], Any] | None = None,
) -> float:
    """A whole model's median milliseconds: an ONNX file (`model` a path) in ONNX Runtime, or
    a `LoadedModel` in torch (inside `activations()`, a context that quantizes its activation
    sites, when given)."""
    threads = threads or torch.get_num_threads()
    if isinstance(model, Path):
        return median_ms(onnx_timer(model, feeds(names, batch), threads), warmup, repeats)
    device = "cuda" if runtime == "torch-cuda" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    module = model.module.to(device)
    inputs = _ensure_device(batch, device)
    try:
        with torch.no_grad(), activations() if activations else _nothing():
            return median_ms(lambda: model(inputs), warmup, repeats, sync)
    finally:
        module.to("cpu")


def _ensure_device(batch: Inputs, device: str) -> Inputs:
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {key: value.to(device) for key, value in batch.items()}


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def export_float(model: LoadedModel, batch: Inputs, path: Path) -> tuple[str, ...]:
    """The FP32 model as plain ONNX (no QDQ), traced as `allocator.export.onnx_qdq` traces;
    its input names."""
    names, tensors = positional_inputs(batch)
    trace(Traced(model, names), tensors, names, path)
    return names


def export_plan(
    model: LoadedModel,
    batch: Inputs,
    module: torch.nn.Module,
    plan: BitPlan,
    folder: Path,
    packed: Path | None = None,
) -> tuple[Path, tuple[str, ...]]:
    """`module` (`model` quantized as `plan`) as the QDQ export a job writes, at
    `folder`/model.onnx, packed first unless `packed` is its artifact already; its input
    names."""
    from allocator.apply import load_packed, pack, read_packed
    from allocator.export.onnx_qdq import export_onnx, replace_module

    if packed is None:
        packed = folder / "plan.safetensors"
        pack(module, plan, packed)
    artifact = read_packed(packed)
    quantized, _ = load_packed(packed, copy.deepcopy(model.module))
    path = folder / "model.onnx"
    exported = export_onnx(replace_module(model, quantized), artifact, batch, path)
    return path, exported.inputs


@dataclass(frozen=True)
class Quantized:
    """A plan to export and time: `module` is the model quantized as `plan`, `packed` its
    packed artifact when there is one already."""

    module: torch.nn.Module
    plan: BitPlan
    packed: Path | None = None


def export_ms(
    model: LoadedModel,
    batch: Inputs,
    quantized: Quantized | None,
    folder: Path,
    *,
    warmup: int,
    repeats: int,
    threads: int | None,
) -> float:
    """ONNX Runtime's median ms on `batch` for `model` exported: plain FP32 (`quantized`
    None) or a plan's QDQ export, written under `folder`."""
    if quantized is None:
        path = folder / "model.onnx"
        names = export_float(model, batch, path)
    else:
        path, names = export_plan(
            model, batch, quantized.module, quantized.plan, folder, quantized.packed
        )
    return end_to_end_ms(
        "onnxruntime-cpu",
        path,
        batch,
        names=names,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
    )
