"""`measure_table`: every weight layer timed alone at every candidate, and the FP32 model end
to end, for the rest of a model run (`rest_ms`) that no layer entry holds.

Imports torch, onnx and onnxruntime.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from allocator.apply import apply
from allocator.errors import BadSpec, BitplanError
from allocator.export.latency.layer_timer import LayerTimer
from allocator.export.latency.machine import machine, model_digest, runtime_version
from allocator.export.latency.timing import (
    REPEATS,
    WARMUP,
    Quantized,
    end_to_end_ms,
    example_input,
    export_ms,
)
from allocator.latency_table import (
    FLOAT_WIDTH,
    LatencyTable,
    act_width,
    check_runtime,
    choice_key,
)
from allocator.layers import LayerTable, build_layer_table, weight_layers
from allocator.plan import BitPlan
from allocator.quant.activation import calibrate
from allocator.zoo.base import Inputs, LoadedModel, run_hooked

WEIGHT_WIDTHS = (2, 3, 4, 5, 6, 8, 16)
ACT_WIDTHS = (4, 6, 8, FLOAT_WIDTH)
REST_WEIGHTS = 8
"""The weight width the rest of a run with quantized activations is measured at, when timed."""
FLAT_NOTE = (
    "{runtime} has no low-bit kernels: bitplan's quantized model runs dequantized float "
    "weights, so every weight width runs the same float kernel and this table is flat in "
    "weight width (only fake-quantized activations add time); a latency budget on it can "
    "only be met by plans that are no slower than float"
)


def measure_table(
    model: LoadedModel,
    input_shape: Sequence[int],
    runtime: str,
    *,
    weight_widths: Sequence[int] = WEIGHT_WIDTHS,
    act_widths: Sequence[int] = ACT_WIDTHS,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    threads: int | None = None,
    progress: Callable[[float, str], None] = lambda _f, _m: None,
) -> LatencyTable:
    """Time every weight layer of `model` at every (weight width, activation width) of the
    candidates, and the FP32 model end to end, on `runtime` at `input_shape`."""
    check_runtime(runtime)
    if runtime == "torch-cuda" and not torch.cuda.is_available():
        raise BadSpec("torch-cuda: this machine has no CUDA device; run it on one that has")
    threads = threads or torch.get_num_threads()
    key = model_digest(model)
    batch = example_input(model, input_shape)
    table = build_layer_table(model, batch, pin_first_last=False)
    inputs = _layer_inputs(model, batch, table.names)
    open_axes = _open_axes(inputs, _layer_inputs(model, _grown(model, input_shape), table.names))
    weights = sorted({int(w) for w in weight_widths} | {FLOAT_WIDTH})
    acts = sorted({act_width(int(a)) for a in act_widths} | {FLOAT_WIDTH})
    modules = dict(model.module.named_modules())
    entries: dict[str, dict[str, float]] = {}
    variants: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bitplan-latency-") as tmp:
        for index, name in enumerate(table.names):
            progress(index / len(table.names), name)
            timer = LayerTimer(
                runtime,
                name,
                modules[name],
                inputs[name],
                Path(tmp),
                threads,
                warmup,
                repeats,
                open_axes[name],
            )
            row = {}
            for w in weights:
                for a in acts:
                    variant = timer.variant(w, a)
                    variants[choice_key(w, a)] = variant
                    row[choice_key(w, a)] = timer.ms(variant, w, a)
            entries[name] = row
        progress(1.0, "end to end")
        fp32 = _fp32_end_to_end(runtime, model, batch, Path(tmp), threads, warmup, repeats)
        act_rests, act_notes = (
            _act_rests(
                model, batch, table, entries, weights, acts, Path(tmp), threads, warmup, repeats
            )
            if runtime == "onnxruntime-cpu"
            else ({}, [])
        )
    layer_sum = sum(row[choice_key(FLOAT_WIDTH, FLOAT_WIDTH)] for row in entries.values())
    flat = runtime != "onnxruntime-cpu"
    notes = [FLAT_NOTE.format(runtime=runtime)] if flat else []
    notes += act_notes
    if fp32 < layer_sum:
        notes.append(
            f"the FP32 model ran in {fp32:.4g} ms end to end, less than its layers' summed "
            f"{layer_sum:.4g} ms alone (the runtime overlaps or fuses work across layers): "
            "rest_ms is 0 and predictions run high"
        )
    return LatencyTable(
        model_sha256=key,
        input_shape=tuple(int(v) for v in input_shape),
        runtime=runtime,
        runtime_version=runtime_version(runtime),
        machine=machine(runtime, threads),
        entries=entries,
        rest_ms=max(fp32 - layer_sum, 0.0),
        fp32_measured_ms=fp32,
        act_rest_ms=act_rests,
        flat=flat,
        settings={
            "warmup": warmup,
            "repeats": repeats,
            "threads": threads,
            "statistic": "median",
            "variants": variants,
            "net_of_call_overhead": runtime == "onnxruntime-cpu",
        },
        notes=tuple(notes),
    )


def _act_rests(
    model: LoadedModel,
    batch: Inputs,
    layers: LayerTable,
    entries: Mapping[str, Mapping[str, float]],
    weights: Sequence[int],
    acts: Sequence[int],
    folder: Path,
    threads: int,
    warmup: int,
    repeats: int,
) -> tuple[dict[str, float], list[str]]:
    """Per quantized activation width, the rest of a run with every site at that width: the
    model exported with every weight at `REST_WEIGHTS` bits (INT8: the W8A8 deployment everyone
    runs, so that plan is predicted exactly; the widest stored width when 8 was not timed) and
    every site min-max quantized, timed end to end, less its layers' entries at that choice. It differs from FP32's rest: the sites' QDQ nodes cost time, and the runtime
    runs integer kernels between quantized sites (MiniLM's attention matmuls), which no layer
    entry holds. It also differs with the weights around it (on MiniLM 1.64 ms at W16A8, 0.9 ms
    at W8A8), so plans far from the reference are predicted less well."""
    from allocator.activations import collect, find_sites

    rests: dict[str, float] = {}
    notes: list[str] = []
    quantized = [a for a in acts if a < FLOAT_WIDTH]
    if not quantized:
        return rests, notes
    stored = [w for w in weights if w < FLOAT_WIDTH]
    if not stored:
        return rests, notes
    reference = REST_WEIGHTS if REST_WEIGHTS in stored else max(stored)
    sites = find_sites(model, batch, layers)
    samples = collect(model, [batch], sites)
    for a in quantized:
        activations = {
            name: {"params": calibrate("minmax", rows, a).to_dict()}
            for name, rows in samples.items()
        }
        plan = replace(
            BitPlan.from_bits(dict.fromkeys(layers.names, reference)),
            activations=activations,
        )
        try:
            measured = export_ms(
                model,
                batch,
                Quantized(apply(model.module, plan), plan),
                folder,
                warmup=warmup,
                repeats=repeats,
                threads=threads,
            )
        except BitplanError as error:
            notes.append(
                f"the rest of a run at {a}-bit activations was not measured ({error}); plans "
                "with quantized activations are predicted with the FP32 rest"
            )
            continue
        layer_sum = sum(row[choice_key(reference, a)] for row in entries.values())
        rests[str(a)] = max(measured - layer_sum, 0.0)
    return rests, notes


def _fp32_end_to_end(
    runtime: str,
    model: LoadedModel,
    batch: Inputs,
    folder: Path,
    threads: int,
    warmup: int,
    repeats: int,
) -> float:
    if runtime != "onnxruntime-cpu":
        return end_to_end_ms(runtime, model, batch, warmup=warmup, repeats=repeats, threads=threads)
    return export_ms(model, batch, None, folder, warmup=warmup, repeats=repeats, threads=threads)


def _layer_inputs(model: LoadedModel, batch: Inputs, names: Sequence[str]) -> dict[str, Tensor]:
    """Each layer's input on `batch` (its first call), as the runtime will feed it alone."""
    seen: dict[str, Tensor] = {}
    wanted = set(names)

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, _out: object) -> None:
            seen.setdefault(name, args[0].detach().clone())

        return hook

    handles = [
        module.register_forward_hook(keep(name))
        for name, module in weight_layers(model.module)
        if name in wanted
    ]
    run_hooked(model, batch, handles)
    return seen


def _grown(model: LoadedModel, input_shape: Sequence[int]) -> Inputs:
    """An example batch one longer on every axis the export leaves open (batch; and sequence
    for token inputs): the layer input axes that change with it are the open ones."""
    grown = [int(v) for v in input_shape]
    grown[0] += 1
    if model.input_kind != "image":
        grown[1] += 1
    return example_input(model, grown)


def _open_axes(
    inputs: Mapping[str, Tensor], grown: Mapping[str, Tensor]
) -> dict[str, tuple[int, ...]]:
    """Per layer, the axes of its input that differ between the two batches."""
    return {
        name: tuple(
            i for i, (a, b) in enumerate(zip(x.shape, grown[name].shape, strict=False)) if a != b
        )
        for name, x in inputs.items()
    }
