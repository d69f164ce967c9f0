"""A loaded model with its calibration statistics: everything a budget needs but the solve.

`allocator.prepare.prepare(spec)` loads the model and data, measures the layers and gathers the
statistics (the budget-free part of a job); the `Workbench` it returns fits, quantizes, checks
and evaluates plans.
`allocator.pipeline.run` builds one per job; benchmarks build one per model and try many methods
and budgets on it. Never imports the web, database or queue layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch

from allocator import costs, in_network
from allocator.activation_bench import ActivationBench, joint_widths, quantizers
from allocator.activations import quantized_activations
from allocator.apply import apply
from allocator.budget import ResolvedBudget
from allocator.cache import CODE_VERSION, Cache, cached, digest
from allocator.context_costs import refine
from allocator.data import (
    EvalSet,
    evaluate_outputs,
    per_sample,
)
from allocator.device import BatchSizes
from allocator.job import (
    FLOAT_ACTS,
    ActWidths,
    FixedActs,
    JobSpec,
    JointActs,
    parse_method,
)
from allocator.job_metrics import FitCheck, PlanCheck, PlanRound
from allocator.layers import LayerTable
from allocator.plan import BitPlan, LayerPlan
from allocator.quant.activation import ActQuantizer
from allocator.sensitivity import Sensitivity, SensitivityContext, sensitivity_costs
from allocator.solve import Solution, fixed_plan, solve
from allocator.weight_rules import (
    RuleSelection,
    divergence_from_fp32,
)
from allocator.zoo.base import Inputs, LoadedModel

FITTED_PLANS_KEPT = 3
"""Plans whose in-network fits a workbench keeps (each as large as the model's weights)."""
Choices = costs.Choices
T = TypeVar("T")


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
    eval_source: str = "eval"
    """Where `evalset` came from (`allocator.job_metrics.EVAL_SOURCES`)."""
    fit_check: FitCheck | None = None
    """What `choose_fit` measured, once it has."""
    cache: Cache | None = None
    """Where fits, cost tables and evaluations are kept by content (`allocator.cache`)."""
    content: str = ""
    """The digest of what every cached step here depends on: the model, the calibration and
    held-out samples and the options that change the statistics (`prepare` sets it)."""
    reused: dict[str, int] = field(default_factory=dict)
    """How many results of each kind came from the cache instead of being computed."""
    batch_sizes: BatchSizes | None = None
    """The calibration and evaluation batch sizes `prepare` chose for the model's device."""
    _eval_digest: str | None = None
    _reference: torch.Tensor | None = None
    _fitted: dict[tuple[Any, ...], Choices] = field(default_factory=dict)
    """Fitted choices by (plan, activation quantizers, neighbours)."""
    _written: set[str] = field(default_factory=set)
    """Cache keys this workbench computed: finding one again is not reuse of earlier work."""
    _fit: str | None = None
    """The fit `choose_fit` chose for `calibration: "auto"`."""

    @property
    def calibration(self) -> str:
        """How plans are fitted: the spec's choice, or for "auto" the one `choose_fit` chose
        (in-network until it has)."""
        if self.spec.calibration != "auto":
            return self.spec.calibration
        return self._fit or "in-network"

    def choose_fit(
        self, bits: int | None, activations: Mapping[str, ActQuantizer] | None = None
    ) -> FitCheck | None:
        """For `calibration: "auto"`, the fit every later plan gets: the uniform plan at `bits`
        (the narrowest width when None) is fitted in the network and on FP32 inputs, and the
        one closer to FP32 on the held-out samples wins.

        In-network fits are least squares to FP32 outputs over the calibration rows; on CNNs
        they halve the uniform plan's divergence, on MiniLM's wide linear layers they overfit
        256 sentences and lower STS Spearman (docs/design.md). One extra held-out pass decides
        per job instead of per model family. Without held-out samples nothing can be judged
        and in-network fits stay. None when nothing was measured.
        """
        if self.spec.calibration != "auto" or self._fit is not None:
            return self.fit_check
        if not self.holdout:
            self._fit = "in-network"
            return None
        width = bits if bits is not None else min(self.spec.bits)
        uniform = self.table.uniform(width)
        measured = {}
        for fit in ("in-network", "fp32"):
            self._fit = fit
            measured[fit] = self.holdout_divergence(uniform, activations)
        self._fit = min(measured, key=measured.__getitem__)
        if self._fit == "fp32":
            self._fitted.clear()
        self.fit_check = FitCheck(width, measured["in-network"], measured["fp32"], self._fit)
        return self.fit_check

    @property
    def reference(self) -> torch.Tensor:
        """FP32 outputs on the evaluation set, computed once."""
        if self._reference is None:
            self._reference = self._evaluated(self.model.module, None)
        return self._reference

    def _cached(
        self,
        what: str,
        parts: tuple[object, ...],
        compute: Callable[[], T],
        encode: Callable[[T], Any] = lambda value: value,
        decode: Callable[[Any], T] = lambda value: value,
    ) -> T:
        """`compute()`, or its value from an earlier job on the same content (`reused` counts
        it under `what`); no cache or no content digest: always computed."""
        cache = self.cache if self.content else None
        key = digest(what, CODE_VERSION, self.content, *parts)
        value, hit = cached(cache, key, compute, encode, decode)
        if hit and key not in self._written:
            self.reused[what] = self.reused.get(what, 0) + 1
        elif not hit:
            self._written.add(key)
        return value

    def cost_table(
        self, method: str, tick: Callable[[float, str], None] = lambda _f, _m: None
    ) -> tuple[np.ndarray, list[Sensitivity], dict[str, float]]:
        """Each layer's cost at each width by `method`, with the methods' scores and seconds
        (none when the table came from the cache)."""

        def measure() -> tuple[np.ndarray, list[Sensitivity], dict[str, float]]:
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

        def encode(value: tuple[np.ndarray, list[Sensitivity], dict[str, float]]) -> Any:
            cost, sensitivities, _timings = value
            return {
                "cost": torch.from_numpy(cost),
                "sensitivities": [
                    {"method": s.method, "cost": torch.from_numpy(s.cost), "scores": s.scores}
                    for s in sensitivities
                ],
            }

        def decode(state: Any) -> tuple[np.ndarray, list[Sensitivity], dict[str, float]]:
            sensitivities = [
                Sensitivity(s["method"], s["cost"].numpy(), dict(s["scores"]))
                for s in state["sensitivities"]
            ]
            return state["cost"].numpy(), sensitivities, {}

        return self._cached("sensitivity", (method, self.spec.seed), measure, encode, decode)

    def fitted(
        self,
        bits: Mapping[str, int],
        activations: Mapping[str, ActQuantizer] | None = None,
        neighbours: bool = False,
    ) -> Choices:
        """The choices plan `bits` is quantized with: with in-network calibration, fitted layer
        by layer in the quantized network (running `activations`), also at each free layer's
        neighbouring widths when `neighbours` (what `allocator.context_costs` moves to);
        otherwise the FP32-input choices of the statistics phase.

        The last few plans' fits are kept: a job fits its plan once for the plan check and
        reuses it to quantize and to pack.
        """
        if self.calibration != "in-network":
            return self.choices
        key = (tuple(sorted(bits.items())), tuple(_activations_key(activations)), neighbours)
        for known, choices in self._fitted.items():
            if known[:2] == key[:2] and (known[2] or not neighbours):
                return choices
        context = None
        if activations and self.activations is not None:
            sites, quantizers_ = self.activations.sites, activations

            def context() -> AbstractContextManager[None]:
                return quantized_activations(self.model.module, sites, quantizers_)

        def fit() -> Choices:
            return in_network.calibrate(
                self.model,
                self.batches,
                self.table,
                bits,
                self.choices,
                widths=self._neighbours if neighbours else None,
                context=context,
            )

        choices = self._cached(
            "fits",
            key,
            fit,
            costs.choices_state,
            lambda state: costs.choices_from_state(state, self.model.module),
        )
        while len(self._fitted) >= FITTED_PLANS_KEPT:
            self._fitted.pop(next(iter(self._fitted)))
        self._fitted[key] = choices
        return choices

    def _neighbours(self, name: str, b: int) -> tuple[int, ...]:
        """`b` and the widths beside it in `spec.bits`; a pinned layer only its pin."""
        pinned = any(layer.name == name and layer.pinned_bits for layer in self.table)
        if pinned or b not in self.spec.bits:
            return (b,)
        widths = sorted(self.spec.bits)
        at = widths.index(b)
        return tuple(widths[max(at - 1, 0) : at + 2])

    def plan(
        self,
        bits: Mapping[str, int],
        meta: Mapping[str, Any],
        activations: Mapping[str, ActQuantizer] | None = None,
    ) -> BitPlan:
        return make_plan(self.table, bits, self.fitted(bits, activations), meta)

    def quantize(
        self, plan: BitPlan, activations: Mapping[str, ActQuantizer] | None = None
    ) -> torch.nn.Module:
        """The quantized model for a plan made by `plan` (with the same `activations`), with
        the codes chosen per layer."""
        choices = self.fitted({name: e.weight_bits for name, e in plan.layers.items()}, activations)
        quantized = {
            name: choices[(name, entry.weight_bits)].quantized
            for name, entry in plan.layers.items()
        }
        return apply(self.model.module, plan, quantized=quantized)

    def uniform_plan(
        self,
        bits: int,
        meta: Mapping[str, Any] | None = None,
        activations: Mapping[str, ActQuantizer] | None = None,
    ) -> BitPlan:
        """Every free layer at `bits` with the same quantizer choices as the mixed plans."""
        return self.plan(
            self.table.uniform(bits), {**(meta or {}), "uniform_bits": bits}, activations
        )

    def holdout_divergence(
        self,
        bits: Mapping[str, int],
        activations: Mapping[str, ActQuantizer] | None = None,
        swap: Mapping[str, int] | None = None,
    ) -> float:
        """How far the plan's outputs move from FP32 on the held-out samples, with
        `activations` quantizing its activation sites when given; `swap` moves a few layers to
        other widths fitted in the plan's context (`fitted(..., neighbours=True)`)."""

        def measure() -> float:
            choices = self.fitted(bits, activations, neighbours=bool(swap))
            widths = {**bits, **(swap or {})}
            layers = {name: choices[(name, b)] for name, b in widths.items()}
            with ExitStack() as stack:
                if activations and self.activations is not None:
                    stack.enter_context(
                        quantized_activations(
                            self.model.module, self.activations.sites, activations
                        )
                    )
                return divergence_from_fp32(
                    self.model, self.holdout, self.holdout_reference, layers
                )

        parts = (
            self.calibration,
            sorted(bits.items()),
            _activations_key(activations),
            sorted((swap or {}).items()),
        )
        return self._cached("held-out checks", parts, measure)

    def site_widths(self, solution: Solution, acts: ActWidths) -> int | dict[str, int]:
        """The activation width of every site under `solution`: the one width of `FixedActs`,
        or (joint) each layer's chosen input width and `baseline_bits` for attention
        probabilities."""
        if isinstance(acts, FixedActs):
            return acts.bits
        sites = self.activations.sites if self.activations is not None else []
        return joint_widths(sites, solution.act_bits, acts.baseline_bits)

    def choose_plan(
        self,
        cost: np.ndarray,
        budget: ResolvedBudget,
        uniform_bits: int | None,
        acts: ActWidths | None = None,
        activations: Mapping[str, ActQuantizer] | None = None,
        tick: Callable[[float, str], None] = lambda _f, _m: None,
    ) -> tuple[Solution, tuple[PlanRound, ...], PlanCheck | None]:
        """The plan a job returns for `budget`: the exact solve of `cost`, re-solved in the
        plan's context while that helps (`allocator.context_costs`, running `activations`, the
        one-width quantizers a weight-only round prices plans with), then checked against the
        uniform plan of `uniform_bits`. A job that lets bitplan choose the fit has it chosen
        first (`choose_fit`)."""
        self.choose_fit(uniform_bits, activations)
        solution = solve(
            self.table,
            self.spec.bits,
            cost,
            budget,
            acts=acts or FLOAT_ACTS,
            time_limit=self.spec.time_limit,
        )
        rounds: tuple[PlanRound, ...] = ()
        if self._refines(acts):
            solution, rounds = refine(
                self,
                solution,
                cost,
                budget,
                acts or FLOAT_ACTS,
                self.spec.context_rounds,
                activations,
                tick,
            )
        solution, check = self.check_against_uniform(
            solution, cost, uniform_bits, acts, self.spec.act_quantizers
        )
        return solution, rounds, check

    def _refines(self, acts: ActWidths | None) -> bool:
        """Whether plans are re-solved with in-context costs: the job asks for rounds, has
        held-out samples to measure on, and allocates weights only (a joint plan's activation
        widths move with its weights, which one-width moves do not price). Plans fitted on FP32
        inputs are refined too: their layers do not interact in the fit, but their errors still
        add up in the network in ways the per-layer table cannot see (docs/design.md)."""
        return (
            self.spec.context_rounds > 0 and bool(self.holdout) and not isinstance(acts, JointActs)
        )

    def check_against_uniform(
        self,
        solution: Solution,
        cost: np.ndarray,
        uniform_bits: int | None,
        acts: ActWidths | None = None,
        act_quantizers: str = "auto",
    ) -> tuple[Solution, PlanCheck | None]:
        """The solver's plan, or the uniform plan of the same budget when that one stays closer
        to FP32 on held-out samples.

        The cost table adds per-layer estimates; errors compound across layers in ways a sum
        cannot see, so a mixed plan can measure below the uniform plan of the same size with the
        same quantizer (docs/design.md has the case that made this check). Two forward passes
        over the held-out samples make sure a job never returns a plan its own check finds
        worse than the uniform one it is compared with. A job that quantizes activations (`acts`: the
        widths `cost` was priced at) runs each plan with its own `act_quantizers`, the uniform
        one at `acts.baseline_bits`, which a kept uniform plan then records for every layer.
        None when nothing was checked.
        """
        if uniform_bits is None or not self.holdout or not solution.bits:
            return solution, None
        uniform = self.table.uniform(uniform_bits)
        if uniform == solution.bits and not isinstance(acts, JointActs):
            return solution, None
        mixed_acts = uniform_acts = None
        if acts is not None and self.activations is not None:
            widths = self.site_widths(solution, acts)
            mixed_acts = quantizers(self.activations.assign(widths, act_quantizers))
            uniform_acts = quantizers(self.activations.assign(acts.baseline_bits, act_quantizers))
        mixed_divergence = self.holdout_divergence(solution.bits, mixed_acts)
        uniform_divergence = self.holdout_divergence(uniform, uniform_acts)
        kept = "uniform" if uniform_divergence < mixed_divergence else "mixed"
        check = PlanCheck(mixed_divergence, uniform_divergence, kept)
        if kept == "mixed":
            return solution, check
        checked = fixed_plan(
            self.table, uniform, self.spec.bits, cost, solution, acts=acts or FLOAT_ACTS
        )
        return checked, check

    def evaluate(
        self,
        module: torch.nn.Module | None = None,
        activations: Mapping[str, ActQuantizer] | None = None,
    ) -> dict[str, float]:
        """Metrics of `module` (FP32 when None) on the evaluation set, with `activations`
        quantizing its activation sites when given."""
        return evaluate_outputs(self._outputs(module, activations), self.evalset, self.reference)

    def score(
        self,
        module: torch.nn.Module | None = None,
        activations: Mapping[str, ActQuantizer] | None = None,
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """`evaluate`'s metrics and each sample's values (`allocator.data.per_sample`), from
        one pass, for a paired comparison of two plans."""
        outputs = self._outputs(module, activations)
        return (
            evaluate_outputs(outputs, self.evalset, self.reference),
            per_sample(outputs, self.evalset, self.reference),
        )

    def _outputs(
        self, module: torch.nn.Module | None, activations: Mapping[str, ActQuantizer] | None
    ) -> torch.Tensor:
        """`module`'s (FP32 when None) outputs on the evaluation set, with `activations`."""
        if module is None and not activations:
            return self.reference  # the FP32 outputs, computed once
        self.reference  # noqa: B018  # computed first, while the model is still FP32
        return self._evaluated(self.model.module if module is None else module, activations)

    def _evaluated(
        self, module: torch.nn.Module, activations: Mapping[str, ActQuantizer] | None
    ) -> torch.Tensor:
        """`module`'s outputs on the evaluation set with `activations`, or those an earlier
        job kept for the same weights, activation quantizers and evaluation samples."""

        def run() -> torch.Tensor:
            target = replace(self.model, module=module)
            with ExitStack() as stack:
                if activations and self.activations is not None:
                    stack.enter_context(
                        quantized_activations(module, self.activations.sites, activations)
                    )
                return self.evalset.outputs(target)

        if self.cache is None or not self.content:
            return run()
        if self._eval_digest is None:
            self._eval_digest = digest(self.evalset.batches, self.evalset.size)
        params = {name: q.to_dict() for name, q in (activations or {}).items()}
        return self._cached("evaluations", (self._eval_digest, module, params), run)


def _activations_key(activations: Mapping[str, ActQuantizer] | None) -> list[tuple[str, str, int]]:
    """Names a job's activation quantizers: each site's is calibrated once per (kind, width)."""
    return sorted((name, q.kind, q.bits) for name, q in (activations or {}).items())
