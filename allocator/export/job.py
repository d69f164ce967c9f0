"""Export a job's packed artifact to ONNX and check it in ONNX Runtime: what the pipeline runs
for a spec with `export: ["onnx"]`, and what `bitplan export` and
`GET /v1/jobs/{id}/artifacts/onnx` run for a job that finished without it.

`export_checked` takes what a running job already holds (the float model, its evaluation set
and FP32 outputs); `export_job` rebuilds those from the spec alone. Either way the model is the
artifact's (`load_packed`), the ONNX graph is written by `allocator.export.onnx_qdq` and
compared with bitplan's model by `allocator.export.parity`; a refusal or a failed parity is an
`ExportCheck` with `passed` false and the reason, and no file.

Imports torch, onnx and onnxruntime; never anything from the service, database or worker layers.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from allocator.apply import load_packed, read_packed
from allocator.data import EvalSet
from allocator.data.evaluate import REFERENCE_METRICS
from allocator.device import CPU
from allocator.errors import BitplanError, ExportRefused, ParityFailed
from allocator.export.onnx_qdq import check_exportable, export_onnx, replace_module, stamp
from allocator.export.parity import METRIC_TOLERANCE, TOLERANCE, Parity, check_parity
from allocator.export.runtime import runtime_name, session_metadata
from allocator.job import JobSpec
from allocator.job_metrics import ExportCheck
from allocator.limits import Limits
from allocator.plan import BitPlan
from allocator.prepare import load_data
from allocator.zoo import load_model
from allocator.zoo.base import Inputs, LoadedModel

ONNX_FILE = "model.onnx"
TRACE_SAMPLES = 2
"""Samples of the first evaluation batch the graph is traced on (its shape is left dynamic)."""


def export_checked(
    model: LoadedModel,
    packed: Path,
    evalset: EvalSet,
    path: Path,
    fp32_reference: torch.Tensor | None = None,
    plan: BitPlan | None = None,
    job_id: str | None = None,
) -> ExportCheck:
    """Export the artifact at `packed` for `model` (the float model: only its architecture
    and output function are used; it is not changed) to ONNX at `path`, and check it on
    `evalset`. `plan`, when given, must be the artifact's own (the job's `bitplan.json`).
    On a refusal or a failed check the file is removed and the check says why.

    Runs on the CPU whatever device the job used: ONNX Runtime runs there (its CPU provider is
    what the check is against), and the graph is traced where the batches are."""
    try:
        artifact = read_packed(packed)
        if plan is not None:
            _check_same_plan(plan, artifact.plan)
        quantizers = check_exportable(artifact.plan.activations)
        model = replace(model, module=copy.deepcopy(model.module).to(CPU))
        quantized, _ = load_packed(packed, model.module)
        rebuilt = replace_module(model, quantized)
        integer: dict[str, Any] = {}
        for rewrite in (True, False):
            exported = export_onnx(
                rebuilt,
                artifact,
                _head(evalset.batches[0]),
                path,
                metadata=session_metadata(),
                integer_conv=rewrite,
            )
            if job_id is not None:
                stamp(path, job_id)
            rewritten = {kind: len(layers) for kind, layers in exported.integer_conv.items()}
            try:
                parity = check_parity(
                    path, exported.inputs, rebuilt, quantizers, evalset, fp32_reference, TOLERANCE
                )
            except ParityFailed as failed:
                if not rewrite or not any(rewritten.values()):
                    raise
                # The integer kernels' own rounding moved too many codes: float kernels then.
                integer = {**rewritten, "kept": False, "why_not": str(failed)}
                continue
            integer = integer or {**rewritten, "kept": any(rewritten.values()), "why_not": None}
            break
    except BitplanError as error:
        path.unlink(missing_ok=True)
        return _failed(
            str(error), len(evalset), evalset.primary_metric, getattr(error, "parity", None)
        )
    return ExportCheck(
        format="onnx",
        passed=True,
        error=None,
        samples=parity.samples,
        max_abs_diff=parity.max_abs_diff,
        mean_abs_diff=parity.mean_abs_diff,
        output_range=parity.output_range,
        tolerance=parity.tolerance,
        metric=parity.metric,
        runtime_metric=parity.runtime_metric,
        bitplan_metric=parity.bitplan_metric,
        metric_tolerance=parity.metric_tolerance,
        storage=dict(Counter(storage.type for storage in exported.weights.values())),
        activation_sites=len(exported.activations),
        file_bytes=path.stat().st_size,
        runtime=runtime_name(),
        over_tolerance=parity.over_tolerance,
        site_codes=None if parity.codes is None else parity.codes.to_dict(),
        runtime_defaults=parity.defaults,
        integer_conv=integer,
    )


def export_job(
    spec: JobSpec,
    packed: Path,
    workdir: Path,
    plan: BitPlan | None = None,
    job_id: str | None = None,
    limits: Limits | None = None,
) -> tuple[Path | None, ExportCheck]:
    """Export a finished job from its spec (local paths: a worker's `runnable_spec`) and its
    packed artifact into `workdir`, evaluated on the job's own evaluation samples; the file is
    None when the check failed."""
    limits = limits or Limits()
    model = load_model(spec.model, spec.weights)
    _calib, eval_data, _source = load_data(spec, limits)
    evalset = EvalSet(eval_data, model, limit=spec.eval_samples)
    reference = None
    if evalset.primary_metric in REFERENCE_METRICS:
        reference = evalset.outputs(model)
    path = workdir / ONNX_FILE
    check = export_checked(model, packed, evalset, path, reference, plan, job_id)
    return (path if check.passed else None), check


def _check_same_plan(given: BitPlan, stored: BitPlan) -> None:
    """A plan that is not the artifact's would put one plan's name on another's codes."""
    for name in sorted(set(given.layers) | set(stored.layers)):
        if given.layers.get(name) != stored.layers.get(name):
            raise ExportRefused(
                f"the artifact does not match the job's plan: layer {name} differs; export the "
                "job's own model artifact"
            )
    if given.activations != stored.activations:
        differing = sorted(
            site
            for site in set(given.activations) | set(stored.activations)
            if given.activations.get(site) != stored.activations.get(site)
        )
        raise ExportRefused(
            f"the artifact does not match the job's plan: activation site {differing[0]} differs"
        )


def _failed(reason: str, samples: int, metric: str, parity: Parity | None) -> ExportCheck:
    """The check of an export that was refused (no figures) or failed its parity check."""
    return ExportCheck(
        format="onnx",
        passed=False,
        error=reason,
        samples=samples,
        max_abs_diff=None if parity is None else parity.max_abs_diff,
        mean_abs_diff=None if parity is None else parity.mean_abs_diff,
        output_range=None if parity is None else parity.output_range,
        tolerance=TOLERANCE,
        metric=metric,
        runtime_metric=None if parity is None else parity.runtime_metric,
        bitplan_metric=None if parity is None else parity.bitplan_metric,
        metric_tolerance=METRIC_TOLERANCE if parity is None else parity.metric_tolerance,
        storage={},
        activation_sites=0,
        file_bytes=0,
        runtime=runtime_name(),
        over_tolerance=None if parity is None else parity.over_tolerance,
        site_codes=None if parity is None or parity.codes is None else parity.codes.to_dict(),
        runtime_defaults=None if parity is None else parity.defaults,
    )


def _head(batch: Inputs) -> Inputs:
    if isinstance(batch, torch.Tensor):
        return batch[:TRACE_SAMPLES]
    return {key: value[:TRACE_SAMPLES] for key, value in batch.items()}
