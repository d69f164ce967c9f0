"""`run(spec, progress)`: the one function every front end (CLI, inline worker, Celery) calls.

It loads the model and data, measures the layers, computes the cost table with the asked
sensitivity methods, solves the integer program for the budget, quantizes, evaluates FP32, the
mixed plan and the uniform plan of the same size (and a few more uniform widths, so the report
has several measured plans), and writes the artifacts and the report into `workdir`.
Storing rows and artifacts is the caller's business: this module never imports the web, database
or queue layers.

`progress(phase, fraction, message)` is called between phases and inside long loops; a caller
that wants to cancel raises `JobCancelled` from it, which stops the run at the next call.
The job's own types (`JobSpec`, `Result`, the phases) live in `allocator.job`, which needs no
torch, so that clients can use them without this module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allocator import costs, memory
from allocator.act_plan import PROBS_ACT_BITS, ActivationBench, joint_widths, quantizers
from allocator.activations import quantized_activations
from allocator.apply import apply, pack
from allocator.budget import Budget, parse_budget
from allocator.data import (
    EvalSet,
    calibration_batches,
    evaluate,
    holdout_batches,
    load_dataset,
)
from allocator.errors import BitplanError, UnsupportedModel
from allocator.job import JobSpec, Progress, Result, act_bits_for, parse_method
from allocator.layers import LayerTable, build_layer_table
from allocator.limits import Limits
from allocator.plan import BitPlan, LayerPlan
from allocator.quant.activation import ActQuantizer
from allocator.report import write_report
from allocator.sensitivity import Sensitivity, SensitivityContext, sensitivity_costs
from allocator.solve import Solution, check_budget, fixed_plan, solve, uniform_bits_for
from allocator.weight_rules import (
    RULE_SETS,
    RuleSelection,
    divergence_from_fp32,
    fp32_outputs,
    select_rules,
)
from allocator.zoo import load_model
from allocator.zoo.base import Inputs, LoadedModel
from allocator.zoo.weights import first_line

FLOAT_ACT_BITS = 32
"""BOPs count float activations at 32 bits."""


def _silent(_phase: str, _fraction: float, _message: str) -> None:
    return None


class _Clock:
    def __init__(self, progress: Progress) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def phase(self, name: str) -> Iterator[Callable[[float, str], None]]:
        self.progress(name, 0.0, "started")
        started = time.perf_counter()
        yield lambda fraction, message: self.progress(name, fraction, message)
        self.timings[name] = round(time.perf_counter() - started, 3)
        self.progress(name, 1.0, "done")


def make_plan(
    table: LayerTable,
    bits: Mapping[str, int],
    choices: Mapping[tuple[str, int], costs.QuantChoice],
    meta: Mapping[str, Any],
) -> BitPlan:
    """A plan that carries each (layer, width)'s chosen clipping rule and bias correction."""
    layers = {}
    for layer in table:
        b = bits[layer.name]
        choice = choices[(layer.name, b)]
        correction = choice.bias_correction
        layers[layer.name] = LayerPlan(
            weight_bits=b,
            clip=choice.clip,
            bias_correction=None if correction is None else correction.tolist(),
            rounding=choice.rounding,
        )
    return BitPlan(layers=layers, meta=dict(meta))


def profile_dict(
    table: LayerTable, bits: tuple[int, ...], cost: np.ndarray, method: str
) -> dict[str, Any]:
    """The cached cost table: enough to re-solve any budget without touching the model."""
    return {
        "method": method,
        "bits": list(bits),
        "layers": [asdict(layer) for layer in table],
        "attention_macs": table.attention_macs,
        "cost": cost.tolist(),
    }


@dataclass
class Workbench:
    """A loaded model with its calibration statistics: everything a budget needs but the solve.

    Benchmarks build one per model and try many methods and budgets on it; `run` builds one per
    job. Nothing here depends on the budget or the sensitivity method.
    """

    spec: JobSpec
    model: LoadedModel
    batches: list[Inputs]
    evalset: EvalSet
    table: LayerTable
    choices: dict[tuple[str, int], costs.QuantChoice]
    activations: ActivationBench | None = None
    """Activation sites and their calibration samples, when the job quantizes activations."""
    rules: RuleSelection | None = None
    """The clipping/rounding rule set each width uses, and why (see allocator.weight_rules)."""
    holdout: list[Inputs] = field(default_factory=list)
    """Calibration samples the statistics were not gathered on, for checks that must not be
    judged on what they were fitted to."""
    holdout_reference: list[torch.Tensor] = field(default_factory=list)
    """FP32 outputs on `holdout`."""
    _reference: torch.Tensor | None = None

    @property
    def reference(self) -> torch.Tensor:
        """FP32 outputs on the evaluation set, computed once."""
        if self._reference is None:
            self._reference = self.evalset.outputs(self.model)
        return self._reference

    def cost_table(
        self, method: str, tick: Callable[[float, str], None] = lambda _f, _m: None
    ) -> tuple[np.ndarray, list[Sensitivity], dict[str, float]]:
        context = SensitivityContext(
            self.model,
            self.batches,
            self.table,
            self.spec.bits,
            self.choices,
            parse_method(method),
            progress=tick,
        )
        cost, sensitivities = sensitivity_costs(context)
        return cost, sensitivities, context.timings

    def plan(self, bits: Mapping[str, int], meta: Mapping[str, Any]) -> BitPlan:
        return make_plan(self.table, bits, self.choices, meta)

    def quantize(self, plan: BitPlan) -> torch.nn.Module:
        """The quantized model for a plan made by `plan`, with the codes chosen per layer."""
        quantized = {
            name: self.choices[(name, entry.weight_bits)].quantized
            for name, entry in plan.layers.items()
        }
        return apply(self.model.module, plan, quantized=quantized)

    def uniform_plan(self, bits: int, meta: Mapping[str, Any] | None = None) -> BitPlan:
        """Every free layer at `bits` with the same quantizer choices as the mixed plans."""
        return self.plan(self.table.uniform(bits), {**(meta or {}), "uniform_bits": bits})

    def holdout_divergence(
        self, bits: Mapping[str, int], activations: Mapping[str, ActQuantizer] | None = None
    ) -> float:
        """How far the plan's outputs move from FP32 on the held-out samples, with
        `activations` quantizing its activation sites when given."""
        layers = {name: self.choices[(name, b)] for name, b in bits.items()}
        with ExitStack() as stack:
            if activations and self.activations is not None:
                stack.enter_context(
                    quantized_activations(self.model.module, self.activations.sites, activations)
                )
            return divergence_from_fp32(self.model, self.holdout, self.holdout_reference, layers)

    def site_widths(
        self, solution: Solution, act_bits: int | tuple[int, ...], probs_bits: int
    ) -> int | dict[str, int]:
        """The activation width of every site under `solution`: `act_bits` when it is one
        width, else (joint) each layer's chosen input width and `probs_bits` for attention
        probabilities."""
        if isinstance(act_bits, int):
            return act_bits
        sites = self.activations.sites if self.activations is not None else []
        return joint_widths(sites, solution.act_bits, probs_bits)

    def check_against_uniform(
        self,
        solution: Solution,
        cost: np.ndarray,
        uniform_bits: int | None,
        act_bits: int | tuple[int, ...] | None = None,
        uniform_act_bits: int = FLOAT_ACT_BITS,
        act_quantizers: str = "auto",
    ) -> tuple[Solution, dict[str, Any] | None]:
        """The solver's plan, or the uniform plan of the same budget when that one stays closer
        to FP32 on held-out samples.

        The cost table adds per-layer estimates; errors compound across layers in ways a sum
        cannot see, and on CIFAR ResNet20 at avg 3 bits every method's mixed plan measured about
        0.5 points below uniform W3 with the same quantizer. Two forward passes over the
        held-out samples make sure a job never returns a plan its own check finds worse than
        the uniform one it is compared with. A job that quantizes activations (`act_bits`: one
        width, or the widths of a joint `cost` table) runs each plan with its own
        `act_quantizers`, the uniform one at `uniform_act_bits`, which a kept uniform plan then
        records for every layer. None when nothing was checked.
        """
        if uniform_bits is None or not self.holdout or not solution.bits:
            return solution, None
        joint = act_bits if isinstance(act_bits, tuple) else None
        uniform = self.table.uniform(uniform_bits)
        if uniform == solution.bits and joint is None:
            return solution, None
        mixed_acts = uniform_acts = None
        if act_bits is not None and self.activations is not None:
            widths = self.site_widths(solution, act_bits, uniform_act_bits)
            mixed_acts = quantizers(self.activations.assign(widths, act_quantizers))
            uniform_acts = quantizers(self.activations.assign(uniform_act_bits, act_quantizers))
        mixed_divergence = self.holdout_divergence(solution.bits, mixed_acts)
        uniform_divergence = self.holdout_divergence(uniform, uniform_acts)
        kept = "uniform" if uniform_divergence < mixed_divergence else "mixed"
        check = {"mixed": mixed_divergence, "uniform": uniform_divergence, "kept": kept}
        if kept == "mixed":
            return solution, check
        checked = fixed_plan(
            self.table,
            uniform,
            self.spec.bits,
            cost,
            solution,
            act_bits=uniform_act_bits,
            act_choices=joint,
        )
        return checked, check

    def evaluate(
        self,
        module: torch.nn.Module | None = None,
        activations: Mapping[str, ActQuantizer] | None = None,
    ) -> dict[str, float]:
        """Metrics of `module` (FP32 when None) on the evaluation set, with `activations`
        quantizing its activation sites when given."""
        target = self.model if module is None else replace(self.model, module=module)
        if not activations or self.activations is None:
            return evaluate(target, self.evalset, self.reference)
        with quantized_activations(target.module, self.activations.sites, activations):
            return evaluate(target, self.evalset, self.reference)


def prepare(
    spec: JobSpec,
    clock: _Clock | None = None,
    budget: Budget | None = None,
    limits: Limits | None = None,
) -> Workbench:
    """Load, measure the layers and gather the calibration statistics (the budget-free part).

    With `budget`, an infeasible one fails as soon as the layer table is known. A job whose
    estimated memory is above `limits` fails before its calibration samples are prepared.
    """
    clock = clock or _Clock(_silent)
    limits = limits or Limits()
    with clock.phase("load"):
        model = load_model(spec.model, spec.weights)
        calib = load_dataset(spec.calib, max_bytes=limits.max_dataset_bytes)
        sample = calibration_batches(calib, model, 1, 1, spec.seed)[0]
        check_forward(model, sample)
        check_memory(spec, model, sample, limits)
        batches = calibration_batches(calib, model, spec.calib_samples, spec.batch_size, spec.seed)
        evalset = EvalSet(
            load_dataset(spec.eval, max_bytes=limits.max_dataset_bytes) if spec.eval else calib,
            model,
            limit=spec.eval_samples,
        )
    with clock.phase("layers"):
        table = build_layer_table(
            model, _first(batches[0]), pin_first_last=spec.pin_first_last, pins=spec.pins
        )
        if budget is not None:
            act_bits = act_bits_for(spec, budget) or FLOAT_ACT_BITS
            check_budget(table, spec.bits, budget.resolve(table), act_bits=act_bits)
    with clock.phase("statistics") as tick:
        stats = costs.input_stats(
            model, batches, table, on_batch=lambda i: tick((i + 1) / len(batches), "inputs")
        )
        candidates = costs.rule_set_choices(
            model, table, stats, spec.bits, RULE_SETS, bias_correction=spec.bias_correction
        )
        tick(0.7, "weight rules")
        holdout = holdout_batches(calib, model, spec.calib_samples, spec.batch_size, spec.seed)
        reference = fp32_outputs(model, holdout)
        choices, rules = select_rules(model, table, candidates, holdout, reference)
        del candidates
        tick(1.0, "activations")
        activations = (
            ActivationBench(model, batches, table, holdout, reference)
            if act_bits_for(spec, budget or parse_budget(spec.budget)) is not None
            else None
        )
    return Workbench(
        spec, model, batches, evalset, table, choices, activations, rules, holdout, reference
    )


def check_forward(model: LoadedModel, sample: Inputs) -> None:
    """Run the model once on one prepared sample, so that a model that cannot run on its data
    (options that do not fit the architecture, a fixed input size) fails in one line naming
    the input, not with a traceback from deep inside its forward."""
    try:
        with torch.no_grad():
            model(sample)
    except BitplanError:
        raise
    except Exception as exc:  # the model's own code: any error it raises
        shape = (
            tuple(sample.shape)
            if isinstance(sample, torch.Tensor)
            else {key: tuple(value.shape) for key, value in sample.items()}
        )
        raise UnsupportedModel(
            f"{model.ref} fails on one calibration sample of shape {shape}: {first_line(exc)}; "
            "check that its options (input size, channels) fit the architecture and the data"
        ) from None


def check_memory(spec: JobSpec, model: LoadedModel, sample: Inputs, limits: Limits) -> None:
    """Refuse the job when its estimated peak memory is above `limits.max_job_memory`."""
    memory.estimate(
        model,
        sample,
        batch_size=spec.batch_size,
        samples=spec.calib_samples,
        widths=len(spec.bits),
    ).check(limits.max_job_memory)


def _baseline_act_bits(act_bits: int | tuple[int, ...], budget: Budget) -> int:
    """The activation width of the uniform plan a job is compared with."""
    if isinstance(act_bits, int):
        return act_bits
    return budget.match[1] if budget.match is not None else PROBS_ACT_BITS


def run(
    spec: JobSpec,
    progress: Progress = _silent,
    workdir: str | Path | None = None,
    limits: Limits | None = None,
) -> Result:
    """Run one job end to end within the operator's `limits`; artifacts go to `workdir` when
    given."""
    limits = limits or Limits()
    spec.validate(limits)
    budget = parse_budget(spec.budget)
    torch.manual_seed(spec.seed)
    clock = _Clock(progress)
    bench = prepare(spec, clock, budget, limits)
    table = bench.table
    resolved = budget.resolve(table)
    act_bits = act_bits_for(spec, budget)
    bops_act = FLOAT_ACT_BITS if act_bits is None else act_bits
    with clock.phase("sensitivity") as tick:
        cost, sensitivities, sensitivity_timings = bench.cost_table(spec.method, tick)
        solve_cost = cost
        if isinstance(act_bits, tuple) and bench.activations is not None:
            errors = {key: choice.output_error for key, choice in bench.choices.items()}
            solve_cost = bench.activations.joint_cost(
                cost, spec.bits, errors, act_bits, spec.act_quantizers
            )
    baseline_act = FLOAT_ACT_BITS if act_bits is None else _baseline_act_bits(act_bits, budget)
    uniform_bits = uniform_bits_for(table, spec.bits, resolved, act_bits=baseline_act)
    acts = bench.activations if act_bits is not None else None
    uniform_acts: dict[str, ActQuantizer] = {}
    if acts is not None:
        uniform_acts = quantizers(acts.assign(baseline_act, spec.act_quantizers))
    with clock.phase("solve"):
        solution = solve(
            table, spec.bits, solve_cost, resolved, act_bits=bops_act, time_limit=spec.time_limit
        )
        solution, plan_check = bench.check_against_uniform(
            solution, solve_cost, uniform_bits, act_bits, baseline_act, spec.act_quantizers
        )
    meta: dict[str, Any] = {"model": spec.model, "budget": spec.budget, "method": spec.method}
    act_quantizers: dict[str, ActQuantizer] = {}
    act_allocation = None
    # The packed artifact carries what a runtime needs to reproduce the activations.
    plan_activations: dict[str, dict[str, Any]] = {}
    if acts is not None and act_bits is not None:
        widths = bench.site_widths(solution, act_bits, baseline_act)
        assignments = acts.assign(widths, spec.act_quantizers)
        act_quantizers = quantizers(assignments)
        act_allocation = [a.to_dict() for a in assignments]
        plan_activations = {
            a.site.name: {**a.to_dict(), "params": a.quantizer.to_dict()} for a in assignments
        }
    with clock.phase("quantize"):
        plan = replace(bench.plan(solution.bits, meta), activations=plan_activations)
        mixed = bench.quantize(plan)
    with clock.phase("evaluate") as tick:
        metrics: dict[str, Any] = {"fp32": bench.evaluate()}
        tick(0.4, "fp32")
        metrics["quantized"] = bench.evaluate(mixed, act_quantizers)
        tick(0.7, "mixed")
        metrics["uniform"] = None
        if uniform_bits is not None:
            uniform = bench.quantize(bench.uniform_plan(uniform_bits, meta))
            metrics["uniform"] = {
                "bits": uniform_bits,
                "act_bits": None if act_bits is None else baseline_act,
                **bench.evaluate(uniform, uniform_acts),
            }
        tick(0.8, "uniform")
        metrics["uniform_widths"] = _uniform_widths(bench, metrics["uniform"], meta, uniform_acts)
        metrics["primary"] = bench.evalset.primary_metric
        metrics["weight_rules"] = bench.rules.to_dict() if bench.rules else {}
        if bench.activations is not None:
            metrics["act_rules"] = bench.activations.rules_to_dict()
        metrics["plan_check"] = plan_check
        metrics["float_layers"] = [layer.to_dict() for layer in table.floating]
        metrics["predicted_cost"] = solution.objective
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
    )
    if workdir is not None:
        with clock.phase("pack"):
            result.artifacts = write_artifacts(Path(workdir), mixed, plan, result)
        result.timings["pack"] = clock.timings["pack"]
    return result


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
Each is one quantization with codes already chosen and one evaluation pass (on CIFAR-10's 10,000
test images, about as long as the FP32 pass); 2 bits is left out because it wrecks most models
and would decide the ranking alone."""


def _uniform_widths(
    bench: Workbench,
    matched: dict[str, Any] | None,
    meta: Mapping[str, Any],
    activations: Mapping[str, ActQuantizer],
) -> list[dict[str, Any]]:
    """Metrics of every uniform width in REPORT_WIDTHS and of the budget's own (reused), with
    the job's activation quantizers."""
    known = {matched["bits"]: matched} if matched else {}
    asked = REPORT_WIDTHS if bench.spec.report_widths else ()
    widths = sorted({b for b in bench.spec.bits if b in asked} | set(known))
    return [
        known.get(b)
        or {
            "bits": b,
            **bench.evaluate(bench.quantize(bench.uniform_plan(b, meta)), activations),
        }
        for b in widths
    ]


def write_artifacts(workdir: Path, mixed: torch.nn.Module, plan: BitPlan, result: Result) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    packed = workdir / "model.safetensors"
    pack(mixed, plan, packed)
    plan_path = workdir / "bitplan.json"
    plan_path.write_text(json.dumps(plan.to_dict(), indent=1))
    profile_path = workdir / "profile.json"
    profile_path.write_text(json.dumps(result.profile))
    return {
        "model": str(packed),
        "bitplan": str(plan_path),
        "profile": str(profile_path),
        **(write_report(workdir, result) if result.spec.report else {}),
    }


def _first(inputs: Inputs) -> Inputs:
    """One sample of a batch: MACs are counted per sample."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1]
    return {k: v[:1] for k, v in inputs.items()}
