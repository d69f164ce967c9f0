"""`run(spec, progress)`: the one function every front end (CLI, inline worker, Celery) calls.

It prepares a `Workbench` (load the model and data, measure the layers, gather the calibration
statistics: `allocator.workbench`), computes the cost table with the asked sensitivity methods,
solves the integer program for the budget, quantizes, evaluates FP32, the mixed plan and the
uniform plan of the same size (and a few more uniform widths, so the report has several measured
plans), and writes the artifacts and the report into `workdir` (`allocator.artifacts`).
Storing rows and artifacts is the caller's business: this module never imports the web, database
or queue layers.

`progress(phase, fraction, message)` is called between phases and inside long loops
(`allocator.clock`); a caller that wants to cancel raises `JobCancelled` from it, which stops the
run at the next call. The job's own types (`JobSpec`, `Result`, the phases) live in
`allocator.job`, which needs no torch, so that clients can use them without this module; they and
`Workbench`, `prepare` are re-exported here for the benchmarks that import them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from allocator.activation_bench import quantizers
from allocator.artifacts import write_artifacts
from allocator.budget import parse_budget
from allocator.cache import Cache
from allocator.clock import Clock, silent
from allocator.data.compare import compare
from allocator.device import describe
from allocator.errors import InfeasibleBudget
from allocator.job import (
    FLOAT_ACTS,
    ActWidths,
    JobSpec,
    JointActs,
    Progress,
    Result,
    act_widths,
)
from allocator.job_metrics import JobMetrics, UniformScores
from allocator.latency_job import PlanRun, job_latency_table, plan_latencies
from allocator.latency_table import LatencyTable
from allocator.layers import LayerTable
from allocator.limits import Limits
from allocator.plan import BitPlan
from allocator.prepare import prepare
from allocator.profile import profile_dict
from allocator.quant.activation import ActQuantizer
from allocator.sensitivity import Sensitivity
from allocator.solve import Solution, check_budget, uniform_bits_for
from allocator.split import Board
from allocator.workbench import Workbench

__all__ = ["JobSpec", "Result", "Workbench", "prepare", "run"]


def run(
    spec: JobSpec,
    progress: Progress = silent,
    workdir: str | Path | None = None,
    limits: Limits | None = None,
    cache: Cache | None = None,
    board: Board | None = None,
) -> Result:
    """Run one job end to end within the operator's `limits`; artifacts go to `workdir` when
    given; with `cache` (and `spec.reuse`), what earlier jobs computed on the same content is
    reused and this job's work kept (`allocator.cache`); with `board`, other workers may
    compute parts of its statistics (`allocator.split`)."""
    limits = limits or Limits()
    spec.validate(limits)
    budget = parse_budget(spec.budget)
    acts = act_widths(spec, budget)
    torch.manual_seed(spec.seed)
    clock = Clock(progress)
    bench = prepare(spec, clock, budget, limits, cache if spec.reuse else None, board)
    table = bench.table
    latency = _latency_table(spec, bench, acts, clock, cache if spec.reuse else None)
    resolved = budget.resolve(table, latency=latency)
    if latency is not None:  # the size terms were checked in `prepare`, this one only now
        check_budget(table, spec.bits, resolved, acts=acts or FLOAT_ACTS)
    act_bench = bench.activations  # the activation sites: None exactly when `acts` is None
    with clock.phase("sensitivity") as tick:
        cost, sensitivities, sensitivity_timings = bench.cost_table(spec.method, tick)
        solve_cost = cost
        if isinstance(acts, JointActs) and act_bench is not None:
            errors = {key: choice.output_error for key, choice in bench.choices.items()}
            solve_cost = act_bench.joint_cost(cost, spec.bits, errors, acts, spec.act_quantizers)
    baseline_act = (acts or FLOAT_ACTS).baseline_bits
    uniform_bits = uniform_bits_for(table, spec.bits, resolved, act_bits=baseline_act)
    uniform_acts: dict[str, ActQuantizer] = {}
    if act_bench is not None:
        uniform_acts = quantizers(act_bench.assign(baseline_act, spec.act_quantizers))
    with clock.phase("solve") as tick:
        solution, rounds, plan_check = bench.choose_plan(
            solve_cost, resolved, uniform_bits, acts, uniform_acts or None, tick
        )
    if not solution.bits:  # each term fits alone, not all together (proved, or no plan found)
        raise InfeasibleBudget(
            f"no plan meets every term of budget {spec.budget!r} together (the solver: "
            f"{solution.status}); loosen one of them",
            smallest_feasible_bits=table.uniform_storage_bits(min(spec.bits)),
        )
    meta: dict[str, Any] = {"model": spec.model, "budget": spec.budget, "method": spec.method}
    act_quantizers: dict[str, ActQuantizer] = {}
    act_allocation = None
    # The packed artifact carries what a runtime needs to reproduce the activations.
    plan_activations: dict[str, dict[str, Any]] = {}
    if act_bench is not None and acts is not None:
        assignments = act_bench.assign(bench.site_widths(solution, acts), spec.act_quantizers)
        act_quantizers = quantizers(assignments)
        act_allocation = [a.to_dict() for a in assignments]
        plan_activations = {
            a.site.name: {**a.to_dict(), "params": a.quantizer.to_dict()} for a in assignments
        }
    with clock.phase("quantize"):
        plan = replace(
            bench.plan(solution.bits, meta, act_quantizers or None), activations=plan_activations
        )
        mixed = bench.quantize(plan, act_quantizers or None)
    with clock.phase("evaluate") as tick:
        fp32 = bench.evaluate()
        tick(0.4, "fp32")
        quantized, mixed_values = bench.score(mixed, act_quantizers)
        tick(0.7, "mixed")
        uniform_act = None if acts is None else baseline_act
        uniform = comparison = None
        model = uniform_plan = None
        if uniform_bits is not None:
            # The plan carries its activation quantizers, as the mixed plan does, so the model
            # quantized from it packs as it is (the latency phase exports it).
            uniform_plan = replace(
                bench.uniform_plan(uniform_bits, meta, uniform_acts or None),
                activations=_activations(uniform_acts),
            )
            model = bench.quantize(uniform_plan, uniform_acts or None)
            scores, uniform_values = bench.score(model, uniform_acts)
            uniform = UniformScores(uniform_bits, scores, uniform_act)
            comparison = compare(
                bench.evalset.primary_metric, mixed_values, uniform_values, bench.evalset.scores
            )
        tick(0.8, "uniform")
        metrics = JobMetrics(
            primary=bench.evalset.primary_metric,
            fp32=fp32,
            quantized=quantized,
            uniform=uniform,
            uniform_widths=_uniform_widths(bench, uniform, meta, uniform_acts, uniform_act),
            weight_rules=bench.rules.to_dict() if bench.rules else {},
            act_rules=None if bench.activations is None else bench.activations.rules_to_dict(),
            plan_check=plan_check,
            float_layers=table.floating,
            predicted_cost=solution.objective,
            comparison=comparison,
            eval_source=bench.eval_source,
            calibration=bench.calibration,
            fit_check=bench.fit_check,
            rounds=rounds,
        )
    if latency is not None:
        with clock.phase("latency-e2e"):
            mixed_run = PlanRun(plan, mixed, act_quantizers, solution.bits, solution.act_bits)
            uniform_run = None
            if uniform_plan is not None and model is not None and uniform_bits is not None:
                uniform_run = PlanRun(
                    uniform_plan,
                    model,
                    uniform_acts,
                    table.uniform(uniform_bits),
                    baseline_act,
                )
            metrics = replace(
                metrics,
                latency=plan_latencies(
                    bench.model,
                    latency,
                    metrics,
                    table,
                    mixed_run,
                    uniform_run,
                    measured_in_job=spec.latency_table is None,
                    budget_ms=resolved.latency_ms,
                ),
            )
    result = Result(
        spec=spec,
        allocation=_allocation(table, solution, plan, sensitivities),
        avg_weight_bits=round(
            sum(layer.params * solution.bits[layer.name] for layer in table) / table.total_params,
            4,
        ),
        weight_bytes=solution.storage_bits / 8,
        solver=solution.to_dict(),
        metrics=metrics,
        timings={
            **clock.timings,
            **{f"sensitivity.{k}": round(v, 3) for k, v in sensitivity_timings.items()},
        },
        plan=plan,
        profile=profile_dict(table, spec.bits, cost, spec.method),
        act_allocation=act_allocation,
        bops=solution.bops,
        phases=clock.phases,
        reused=dict(bench.reused),
        device=_device(bench),
    )
    if workdir is not None:
        with clock.phase("pack"):
            result.artifacts = write_artifacts(Path(workdir), mixed, plan, result)
            if "onnx" in spec.export:
                _export_onnx(bench, plan, result, Path(workdir))
        result.timings["pack"] = clock.timings["pack"]
    return result


def _export_onnx(bench: Workbench, plan: BitPlan, result: Result, workdir: Path) -> None:
    """The packed model as ONNX, checked in ONNX Runtime on the job's evaluation samples
    (`allocator.export`): `metrics.exports["onnx"]` says how it went, and the file joins the
    artifacts only when the check passed; a failed export does not fail the job."""
    from allocator.export.job import ONNX_FILE, export_checked  # loads onnx and onnxruntime

    path = workdir / ONNX_FILE
    packed = Path(result.artifacts["model"])
    check = export_checked(bench.model, packed, bench.evalset, path, bench.reference, plan)
    result.metrics = replace(result.metrics, exports={"onnx": check})
    if check.passed:
        result.artifacts["onnx"] = str(path)


def _latency_table(
    spec: JobSpec,
    bench: Workbench,
    acts: ActWidths | None,
    clock: Clock,
    cache: Cache | None,
) -> LatencyTable | None:
    """The job's latency table (`allocator.latency_job`), measured in a phase of its own when
    the job measures it."""
    if spec.latency_table is None and spec.latency_runtime is None:
        return None
    with clock.phase("latency"):
        sample = bench.evalset.batches[0]
        return job_latency_table(spec, bench.model, sample, bench.table, acts, cache)


def _activations(quantizers: Mapping[str, ActQuantizer]) -> dict[str, dict[str, Any]]:
    """A plan's `activations` entries for quantizers (what the packed metadata carries)."""
    return {site: {"params": q.to_dict()} for site, q in quantizers.items()}


def _device(bench: Workbench) -> dict[str, Any]:
    """Where the job ran and with which batch sizes (`Result.device`)."""
    sizes = bench.batch_sizes
    return {
        **describe(bench.model.device),
        "calibration_batch_size": sizes.calibration if sizes else bench.spec.batch_size,
        "evaluation_batch_size": sizes.evaluation if sizes else None,
    }


def _allocation(
    table: LayerTable, solution: Solution, plan: BitPlan, sensitivities: list[Sensitivity]
) -> list[dict[str, Any]]:
    return [
        {
            "layer": layer.name,
            "kind": layer.kind,
            "weight_bits": solution.bits[layer.name],
            "params": layer.params,
            "clip": plan.layers[layer.name].clip,
            "pinned": layer.pinned_bits is not None,
            "sensitivity": {s.method: s.scores.get(layer.name) for s in sensitivities},
        }
        for layer in table
    ]


# --- report points: more measured plans for allocator.report ------------------------------------

REPORT_WIDTHS = range(3, 9)
"""Uniform widths (of `spec.bits`) a job with `report_widths` also evaluates, besides the one
matching its budget, so the report ranks predicted against measured loss over several plans.
Each is one quantization with codes already chosen and one evaluation pass (as long as the FP32
pass); 2 bits is left out because it wrecks most models and would decide the ranking alone."""


def _uniform_widths(
    bench: Workbench,
    matched: UniformScores | None,
    meta: Mapping[str, Any],
    activations: Mapping[str, ActQuantizer],
    act_bits: int | None,
) -> tuple[UniformScores, ...]:
    """Scores of every uniform width in REPORT_WIDTHS and of the budget's own (reused), with
    the job's activation quantizers (at `act_bits`)."""
    known = {matched.bits: matched} if matched else {}
    asked = REPORT_WIDTHS if bench.spec.report_widths else ()
    widths = sorted({b for b in bench.spec.bits if b in asked} | set(known))
    return tuple(
        known.get(b)
        or UniformScores(
            b,
            bench.evaluate(
                bench.quantize(
                    bench.uniform_plan(b, meta, activations or None), activations or None
                ),
                activations,
            ),
            act_bits,
        )
        for b in widths
    )
