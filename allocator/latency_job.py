"""A job's latency table and its end-to-end latency figures (issue 14, parts 3-4).

A job with a latency budget, a `latency_table` or a `latency_runtime` gets a latency table
here: the stored one its spec names (a worker or the CLI has written it to a JSON file by then,
`workers.record.runnable_spec`), or one measured now on this machine's runtime at one
evaluation sample's shape (`allocator.export.latency`), reused from the cache when this model
was measured here before with the same widths. The table must be this model's: its content
digest is checked, so a table measured on other weights is refused in one line.

After the model is packed, `plan_latencies` runs FP32, the uniform plan and the mixed plan end
to end on the table's runtime and input shape (ONNX Runtime: each exported as the QDQ model
`allocator.export.onnx_qdq` writes, FP32 as plain ONNX; torch: bitplan's quantized modules)
and puts each beside its prediction from the table, for the result's `metrics.latency` and
the report. Nothing here asserts a speed-up: a runtime without fast low-bit kernels shows
quantized plans slower than FP32, and the figures say so.

Imports torch, onnx and onnxruntime; never anything from the service, database or worker layers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from allocator.cache import CODE_VERSION, Cache, cached, digest
from allocator.errors import BadSpec, BitplanError
from allocator.job import FixedActs, JobSpec, JointActs
from allocator.job_metrics import JobMetrics, LatencyFigures, PlanLatency
from allocator.latency_table import FLOAT_WIDTH, LatencyTable, act_width, fingerprint
from allocator.layers import LayerTable
from allocator.plan import BitPlan
from allocator.quant.activation import ActQuantizer
from allocator.zoo.base import Inputs, LoadedModel

JOB_WARMUP = 10
JOB_REPEATS = 50


def cpu_model(model: LoadedModel) -> LoadedModel:
    """A CPU copy of `model` (the job's may live on a GPU): what is timed and digested."""
    return dataclasses.replace(model, module=copy.deepcopy(model.module).cpu().eval())


def widths_needed(spec: JobSpec, table: LayerTable, acts: FixedActs | JointActs | None) -> tuple:
    """The weight and activation widths a job's program and report price: the candidates,
    the pins, 16-bit, and every activation width the job can run at (float always)."""
    weights = sorted({*spec.bits, *table.pinned_widths().values(), 16})
    act_choices = {FLOAT_WIDTH}
    if isinstance(acts, FixedActs):
        act_choices.add(act_width(acts.bits))
    elif isinstance(acts, JointActs):
        act_choices |= {act_width(a) for a in (*acts.widths, acts.baseline_bits)}
    return tuple(weights), tuple(sorted(act_choices))


def job_latency_table(
    spec: JobSpec,
    model: LoadedModel,
    sample: Inputs,
    layers: LayerTable,
    acts: FixedActs | JointActs | None,
    cache: Cache | None = None,
) -> LatencyTable | None:
    """The job's latency table: the one its spec names (a JSON file by now), or measured on
    `spec.latency_runtime` at `sample`'s shape with one sample; None when it asks for none."""
    if spec.latency_table is None and spec.latency_runtime is None:
        return None
    from allocator.export.latency import (  # loads onnxruntime
        machine,
        measure_table,
        model_digest,
        runtime_version,
    )

    timed = cpu_model(model)
    own = model_digest(timed)
    if spec.latency_table is not None:
        table = read_table_file(spec.latency_table)
        if table.model_sha256 != own:
            raise BadSpec(
                f"latency table {table.table_id or spec.latency_table} was measured on another "
                f"model (content {table.model_sha256[:12]}, this model {own[:12]}); profile this "
                "model's weights (bitplan profile-latency)"
            )
        missing = sorted(set(layers.names) - set(table.entries))
        if missing:
            raise BadSpec(f"latency table has no entries for layers {missing[:5]}")
        return table
    runtime = spec.latency_runtime or "onnxruntime-cpu"
    shape = _one_sample_shape(sample)
    weights, act_choices = widths_needed(spec, layers, acts)
    key = digest(
        "latency-table",
        CODE_VERSION,
        own,
        list(shape),
        runtime,
        runtime_version(runtime),
        fingerprint(machine(runtime)),
        list(weights),
        list(act_choices),
        JOB_WARMUP,
        JOB_REPEATS,
    )

    def measure() -> LatencyTable:
        return measure_table(
            timed,
            shape,
            runtime,
            weight_widths=weights,
            act_widths=act_choices,
            warmup=JOB_WARMUP,
            repeats=JOB_REPEATS,
        )

    table, _reused = cached(
        cache,
        key,
        measure,
        lambda value: json.dumps(value.to_dict()),
        lambda text: LatencyTable.from_dict(json.loads(text)),
    )
    return table


def read_table_file(path: str) -> LatencyTable:
    """A latency table's JSON (as `bitplan profile-latency --json` prints it, or as a worker
    writes a stored table for a job)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise BadSpec(
            f"latency_table {path[:80]!r} is neither a stored table of yours nor a table file"
        ) from None
    return LatencyTable.from_dict(data)


def _one_sample_shape(sample: Inputs) -> tuple[int, ...]:
    if isinstance(sample, torch.Tensor):
        return (1, *sample.shape[1:])
    first = next(iter(sample.values()))
    return (1, *first.shape[1:])


# --- end to end ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlanRun:
    """A quantized plan to time end to end: its plan, its module, its activation quantizers,
    and its packed artifact when there is one already (the mixed plan's)."""

    plan: BitPlan
    module: torch.nn.Module
    quantizers: Mapping[str, ActQuantizer]
    weights: Mapping[str, int]
    act_bits: int | Mapping[str, int]
    packed: Path | None = None


def plan_latencies(
    model: LoadedModel,
    table: LatencyTable,
    metrics: JobMetrics,
    layers: LayerTable,
    mixed: PlanRun,
    uniform: PlanRun | None,
    *,
    measured_in_job: bool,
    budget_ms: float | None,
) -> LatencyFigures:
    """FP32, uniform and mixed predicted from `table` and measured end to end on its runtime
    and input shape; a plan that cannot run there (an export refused) keeps its prediction and
    says why."""
    from allocator.export.latency import example_input

    primary = metrics.primary
    timed = cpu_model(model)
    batch = example_input(timed, table.input_shape)
    measured, error = _measured(table, timed, batch, None)
    rows = [
        PlanLatency(
            "fp32", None, table.fp32_ms(layers.names), measured, metrics.fp32.get(primary), error
        )
    ]
    if uniform is not None and metrics.uniform is not None:
        measured, error = _measured(table, timed, batch, uniform)
        rows.append(
            PlanLatency(
                "uniform",
                metrics.uniform.bits,
                table.predict(uniform.weights, uniform.act_bits),
                measured,
                metrics.uniform.scores.get(primary),
                error,
            )
        )
    measured, error = _measured(table, timed, batch, mixed)
    rows.append(
        PlanLatency(
            "mixed",
            None,
            table.predict(mixed.weights, mixed.act_bits),
            measured,
            metrics.quantized.get(primary),
            error,
        )
    )
    predicted = {}
    for scores in metrics.measured_uniform():
        try:
            predicted[str(scores.bits)] = table.predict(
                layers.uniform(scores.bits), scores.act_bits or FLOAT_WIDTH
            )
        except BadSpec:  # a width the table was not measured at
            continue
    return LatencyFigures(
        runtime=table.runtime,
        runtime_version=table.runtime_version,
        input_shape=tuple(table.input_shape),
        table_id=table.table_id,
        measured_in_job=measured_in_job,
        budget_ms=budget_ms,
        plans=tuple(rows),
        uniform_predicted=predicted,
        notes=tuple(table.notes),
        table=table.to_dict() if measured_in_job and table.table_id is None else None,
    )


def _measured(
    table: LatencyTable, model: LoadedModel, batch: Inputs, run: PlanRun | None
) -> tuple[float | None, str | None]:
    """A plan's (FP32 when `run` is None) median ms end to end, or None and why not."""
    from allocator.export.latency import Quantized, end_to_end_ms, export_ms

    settings = table.settings
    warmup = int(settings.get("warmup", JOB_WARMUP))
    repeats = int(settings.get("repeats", JOB_REPEATS))
    threads = settings.get("threads")
    try:
        if table.runtime == "onnxruntime-cpu":
            quantized = None if run is None else Quantized(run.module, run.plan, run.packed)
            with tempfile.TemporaryDirectory(prefix="bitplan-e2e-") as tmp:
                return export_ms(
                    model,
                    batch,
                    quantized,
                    Path(tmp),
                    warmup=warmup,
                    repeats=repeats,
                    threads=threads,
                ), None
        if run is None:
            return end_to_end_ms(
                table.runtime, model, batch, warmup=warmup, repeats=repeats, threads=threads
            ), None
        from allocator.export.parity import bitplan_forward

        quantized = dataclasses.replace(model, module=copy.deepcopy(run.module).cpu().eval())
        return end_to_end_ms(
            table.runtime,
            quantized,
            batch,
            warmup=warmup,
            repeats=repeats,
            threads=threads,
            activations=lambda: bitplan_forward(quantized, run.quantizers),
        ), None
    except BitplanError as error:
        return None, str(error)
