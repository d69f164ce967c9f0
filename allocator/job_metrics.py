"""What a job measured: the scores of FP32, of the returned plan and of the uniform plans, the
checks behind the plan, the paired comparison with uniform and where the evaluation samples came
from, as typed values whose `to_dict()` is the `metrics` object clients read.

Torch-free for the same reason as `allocator.job` (which holds the `Result` these sit in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

HIGHER_IS_BETTER = {
    "top1": True,
    "spearman": True,
    "agreement": True,
    "kl": False,
    "mse": False,
    "perplexity": False,
}
"""Every metric `allocator.data.evaluate` reports, and which way is better."""
Scores = dict[str, float]
"""One model's metrics on the evaluation set, by name (the keys of `HIGHER_IS_BETTER`)."""

EVAL_SOURCES = {
    "eval": "your --eval file",
    "holdout": "held-out part of the calibration data",
    "calibration": "the calibration data (explicit)",
}
"""Where a job's evaluation samples came from (`JobMetrics.eval_source`), and how front ends
name it: the user's evaluation file; a part of the calibration file held out before any
calibration draw (a job given no evaluation file); or the calibration file itself, only when
the job asked for it."""
METRIC_LABELS = {"agreement": "agreement with FP32", "kl": "KL to FP32", "mse": "MSE to FP32"}
"""How summaries name the metrics that compare with FP32; the others go by their key."""
SMALL_METRICS = frozenset({"kl", "mse"})
"""Metrics whose values are fractions of a unit: printed to three significant digits."""
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no measurable difference"
VERDICTS = (BETTER, WORSE, NO_DIFFERENCE)
"""What a `Comparison` concludes from its interval on the primary metric."""


def verdict(metric: str, low: float, high: float) -> str:
    """`BETTER` or `WORSE` when the interval of (mixed - uniform) on `metric` excludes 0, the
    direction read from `HIGHER_IS_BETTER`; `NO_DIFFERENCE` when it holds 0 (or is not a pair
    of numbers: a resampled Spearman of constant scores)."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
        return NO_DIFFERENCE
    return BETTER if (low > 0) == HIGHER_IS_BETTER.get(metric, True) else WORSE


class Record:
    """A frozen dataclass of plain values whose JSON form is its fields, by name."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """A field stored results predate keeps its default."""
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class UniformScores:
    """The scores of a uniform plan: every free layer's weights at `bits`, every activation at
    `act_bits` (None: float activations)."""

    bits: int
    scores: Scores
    act_bits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "act_bits": self.act_bits, **self.scores}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UniformScores:
        scores = dict(data)
        bits = int(scores.pop("bits"))
        act_bits = scores.pop("act_bits", None)
        return cls(bits, scores, act_bits)


@dataclass(frozen=True)
class PlanCheck(Record):
    """How far the solver's plan (`mixed`) and the uniform plan of the same size moved from FP32
    on held-out samples, and the one the job `kept` ("mixed" or "uniform")."""

    mixed: float
    uniform: float
    kept: str


@dataclass(frozen=True)
class FitCheck(Record):
    """The held-out divergence from FP32 of the uniform plan at `bits` fitted in the network
    and on FP32 inputs, and the fit the job `chose` for all its plans ("in-network" or
    "fp32"): what `calibration: "auto"` decides by."""

    bits: int
    in_network: float
    fp32: float
    chose: str

    def text(self) -> str:
        """`chosen by held-out divergence of uniform W3: 0.0686 in the network, 0.1467 on FP32
        inputs`."""
        return (
            f"chosen by held-out divergence of uniform W{self.bits}: {self.in_network:.4g} in "
            f"the network, {self.fp32:.4g} on FP32 inputs"
        )


@dataclass(frozen=True)
class FloatLayer(Record):
    """A weight layer bitplan leaves in float, and why (a line a user can act on)."""

    name: str
    type: str
    params: int
    reason: str


@dataclass(frozen=True)
class Difference(Record):
    """Mixed minus uniform on one metric, over the same evaluation samples: the difference on the
    whole set (`value`) and its paired bootstrap interval [`low`, `high`], in the metric's units
    (points for top-1, agreement and Spearman; perplexity for perplexity)."""

    metric: str
    value: float
    low: float
    high: float

    def text(self) -> str:
        """`+0.42 [-0.10, +0.95]`; three significant digits for MSE and KL."""
        form = "+.3g" if self.metric in SMALL_METRICS else "+.2f"
        value, low, high = (format(x, form) for x in (self.value, self.low, self.high))
        return f"{value} [{low}, {high}]"


@dataclass(frozen=True)
class Comparison:
    """The plan a job compares (mixed widths) against the uniform plan of the same size, sample
    by sample on the same evaluation samples (`allocator.data.compare`): on the primary metric
    and on closeness to FP32 (agreement for classifiers and causal LMs, MSE for embeddings; None
    where that is the primary metric), each with a paired bootstrap interval of `confidence`
    over `resamples` resamples of the `samples` evaluation samples (pairs for STS, windows for a
    causal LM). `verdict` follows from the primary interval alone."""

    primary: Difference
    closeness: Difference | None
    samples: int
    resamples: int
    confidence: float = 0.95

    @property
    def verdict(self) -> str:
        return verdict(self.primary.metric, self.primary.low, self.primary.high)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "primary": self.primary.to_dict(),
            "closeness": None if self.closeness is None else self.closeness.to_dict(),
            "samples": self.samples,
            "resamples": self.resamples,
            "confidence": self.confidence,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Comparison:
        closeness = data.get("closeness")
        return cls(
            primary=Difference.from_dict(data["primary"]),
            closeness=None if closeness is None else Difference.from_dict(closeness),
            samples=data["samples"],
            resamples=data["resamples"],
            confidence=data.get("confidence", 0.95),
        )

    def differences_text(self) -> str:
        """`top1 +0.42 [+0.10, +0.95], agreement with FP32 +1.20 [+0.50, +1.90]`."""
        parts = [self.primary, *([self.closeness] if self.closeness is not None else [])]
        return ", ".join(f"{METRIC_LABELS.get(d.metric, d.metric)} {d.text()}" for d in parts)

    def method_text(self) -> str:
        """`95% paired bootstrap intervals over 500 samples`."""
        return f"{self.confidence:.0%} paired bootstrap intervals over {self.samples} samples"

    def text(self) -> str:
        """`better: top1 +0.42 [+0.10, +0.95], agreement with FP32 +1.20 [+0.50, +1.90] (95%
        paired bootstrap intervals over 500 samples)`: what summaries print after "mixed vs
        uniform"."""
        return f"{self.verdict}: {self.differences_text()} ({self.method_text()})"


@dataclass(frozen=True)
class PlanRound(Record):
    """One round of costs measured around the plan (`allocator.context_costs`): the held-out
    divergence from FP32 of the round's plan once calibrated in the network, how many layers
    it moved from the plan kept before it, and whether it was kept. Round 0 is the first solve."""

    round: int
    divergence: float
    changed: int
    kept: bool


def rounds_text(rounds: tuple[PlanRound, ...]) -> str:
    """`held-out divergence by round 0.0807 -> 0.1116 (not kept)`; empty when no round re-solved."""
    if len(rounds) < 2:
        return ""
    steps = " -> ".join(f"{r.divergence:.4g}{'' if r.kept else ' (not kept)'}" for r in rounds)
    return f"held-out divergence by round {steps}"


@dataclass(frozen=True)
class PlanLatency(Record):
    """One plan's latency: predicted from the latency table (its layers' entries plus the
    table's `rest_ms`) and measured end to end on the same runtime and input shape (None when
    it could not be run there: `error` says why), with its primary metric."""

    plan: str
    """"fp32", "uniform" or "mixed"."""
    weight_bits: int | None
    """The uniform plan's width; None for FP32 and the mixed plan."""
    predicted_ms: float
    measured_ms: float | None
    metric: float | None
    error: str | None = None


@dataclass(frozen=True)
class LatencyFigures(Record):
    """What a job with a latency table measured (`allocator.latency_job`): its runtime and
    input shape, the budget in milliseconds when the budget had a latency term, FP32, the
    uniform plan and the mixed plan predicted against measured, and the predicted latency of
    every uniform width evaluated (for the quality-vs-latency chart)."""

    runtime: str
    runtime_version: str
    input_shape: tuple[int, ...]
    table_id: str | None
    measured_in_job: bool
    budget_ms: float | None
    plans: tuple[PlanLatency, ...]
    uniform_predicted: dict[str, float]
    """Predicted ms per uniform width ("4": ...), at the uniform plan's activation width."""
    notes: tuple[str, ...] = ()
    table: dict[str, Any] | None = None
    """The table measured in the job, until the job is recorded (it is then stored and named
    by `table_id`)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyFigures:
        values = dict(data)
        values["input_shape"] = tuple(values.get("input_shape") or ())
        values["plans"] = tuple(PlanLatency.from_dict(p) for p in values.get("plans") or ())
        values["notes"] = tuple(values.get("notes") or ())
        values["uniform_predicted"] = dict(values.get("uniform_predicted") or {})
        return cls(**values)

    def plan(self, name: str) -> PlanLatency | None:
        return next((p for p in self.plans if p.plan == name), None)

    def text(self) -> str:
        """`latency (onnxruntime-cpu, 1x3x32x32): fp32 0.57 ms (predicted 0.57) ...`."""
        shape = "x".join(map(str, self.input_shape))
        parts = []
        for entry in self.plans:
            name = entry.plan if entry.weight_bits is None else f"uniform W{entry.weight_bits}"
            measured = "not run" if entry.measured_ms is None else f"{entry.measured_ms:.3f} ms"
            parts.append(f"{name} {measured} (predicted {entry.predicted_ms:.3f})")
        budget = "" if self.budget_ms is None else f", budget {self.budget_ms:.3f} ms predicted"
        return f"latency ({self.runtime}, {shape}{budget}): " + "  ".join(parts)


@dataclass(frozen=True)
class ExportCheck(Record):
    """A job's model exported to a runtime format and run there (`allocator.export`): how far
    the runtime's outputs are from bitplan's own quantized model on the job's evaluation
    samples, and the primary metric of both.

    `passed` is false when the largest difference is above `tolerance` times the output range
    of bitplan's model or the metrics differ by more than `metric_tolerance`; `error` then
    names the first layer whose outputs diverge (or why the export was refused) and no file
    was kept. `storage` counts the planned layers per stored type ("INT4", "INT8", "FLOAT16").
    """

    format: str
    passed: bool
    error: str | None
    samples: int
    max_abs_diff: float | None
    mean_abs_diff: float | None
    output_range: float | None
    """None (with the runtime and bitplan metrics) when the export was refused before a run."""
    tolerance: float
    metric: str
    runtime_metric: float | None
    bitplan_metric: float | None
    metric_tolerance: float
    storage: dict[str, int]
    activation_sites: int
    file_bytes: int
    runtime: str
    over_tolerance: int | None = None
    """Samples whose outputs differ by more than `tolerance` of the range; None before a run.
    With quantized activations a value at a code boundary may round the other way in the
    runtime's float order and move later layers: `site_codes` then decides."""
    site_codes: dict[str, Any] | None = None
    """With quantized activations whose outputs differ beyond `tolerance`: the codes compared
    site by site, each site given the runtime's codes before it (`allocator.export.parity`:
    codes compared, one step off, further, the worst site and its share, and the outputs'
    difference computed from the runtime's codes)."""
    runtime_defaults: dict[str, float] | None = None
    """`max_abs_diff` and `runtime_metric` in a session with the runtime's defaults, which
    for ONNX Runtime rewrite parts of the graph into another model (`allocator.export.parity`);
    the check itself runs with the session settings the file's metadata names."""
    integer_conv: dict[str, Any] | None = None
    """How many convolutions were rewritten for ONNX Runtime's integer kernels
    (`folded_batchnorm`, `int32_bias`: `allocator.export.onnx_qdq.integer_conv`) and whether
    the file keeps them (`kept`); when their rounding failed the check, the file is the float
    kernels' export and `why_not` says what the check found."""

    def text(self) -> str:
        """`onnx: max abs diff 2.4e-06 (3.1e-07 of the output range), top1 76.65 in
        onnxruntime 1.32.0 vs 76.65 in bitplan, 85,432 bytes`."""
        if not self.passed or self.max_abs_diff is None or self.output_range is None:
            return f"{self.format}: failed: {self.error}"
        relative = self.max_abs_diff / self.output_range if self.output_range else 0.0
        return (
            f"{self.format}: max abs diff {self.max_abs_diff:.2g} ({relative:.2g} of the output "
            f"range), {self.metric} {self.runtime_metric:.2f} in {self.runtime} vs "
            f"{self.bitplan_metric:.2f} in bitplan, {self.file_bytes:,} bytes"
        )


@dataclass(frozen=True)
class JobMetrics:
    """What a job measured: the scores of FP32, of the plan it returns (`quantized`) and of the
    uniform plans, with the checks and choices behind the plan.

    `to_dict()` is the `metrics` object of results (API, database, `bitplan run --json`), whose
    keys clients read; `from_dict` reads it back.
    """

    primary: str
    """The metric plans are compared by (`allocator.data.evaluate` picks it from the data)."""
    fp32: Scores
    quantized: Scores
    """The returned plan: mixed widths, or the uniform plan when `plan_check` kept it."""
    uniform: UniformScores | None = None
    """The widest uniform plan that fits the budget, None when none does."""
    uniform_widths: tuple[UniformScores, ...] = ()
    """Every uniform plan evaluated for the report, narrow to wide, `uniform` included."""
    weight_rules: Mapping[str, Any] = field(default_factory=dict)
    """Per width, the clipping/rounding rule set chosen and why (`allocator.weight_rules`)."""
    act_rules: Mapping[str, Any] | None = None
    """Per width, each activation role's quantizer `auto` chose; None without activations."""
    plan_check: PlanCheck | None = None
    float_layers: tuple[FloatLayer, ...] = ()
    predicted_cost: float | None = None
    """The cost table's summed loss of the returned plan (what the solver minimised)."""
    comparison: Comparison | None = None
    """Mixed minus uniform at the same size, sample by sample, with intervals and a verdict;
    None when no uniform plan fits or the job predates it."""
    eval_source: str = "eval"
    """Where the evaluation samples came from: a key of `EVAL_SOURCES`."""
    calibration: str = "fp32"
    """How weights were fitted: "in-network" (each layer on the quantized network's inputs) or
    "fp32" (each on FP32 inputs; what results from before in-network calibration did)."""
    fit_check: FitCheck | None = None
    """Why `calibration` is what it is, when the job chose it (`calibration: "auto"`)."""
    rounds: tuple[PlanRound, ...] = ()
    """The plan's rounds of in-context costs, round 0 first; empty when none ran."""
    exports: Mapping[str, ExportCheck] = field(default_factory=dict)
    """Per exported format ("onnx"), the runtime check of the exported model; empty when the
    job exported nothing."""
    latency: LatencyFigures | None = None
    """Predicted against measured latency of FP32, uniform and mixed, when the job had a
    latency table; None (and no key in `to_dict`) otherwise."""

    @property
    def fit_text(self) -> str:
        """`weights fitted in the network (chosen by held-out divergence of uniform W3: ...)`."""
        fitted = "in the network" if self.calibration == "in-network" else "on FP32 inputs"
        why = f" ({self.fit_check.text()})" if self.fit_check is not None else ""
        return f"weights fitted {fitted}{why}"

    @property
    def eval_source_text(self) -> str:
        """`eval_source` as front ends print it ("held-out part of the calibration data")."""
        return EVAL_SOURCES.get(self.eval_source, self.eval_source)

    def measured_uniform(self) -> tuple[UniformScores, ...]:
        """Every evaluated uniform plan; a result from before `uniform_widths` has one."""
        if self.uniform_widths:
            return self.uniform_widths
        return (self.uniform,) if self.uniform is not None else ()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "fp32": self.fp32,
            "quantized": self.quantized,
            "uniform": None if self.uniform is None else self.uniform.to_dict(),
            "uniform_widths": [u.to_dict() for u in self.uniform_widths],
            "primary": self.primary,
            "weight_rules": dict(self.weight_rules),
        }
        if self.act_rules is not None:
            data["act_rules"] = dict(self.act_rules)
        data["plan_check"] = None if self.plan_check is None else self.plan_check.to_dict()
        data["float_layers"] = [layer.to_dict() for layer in self.float_layers]
        data["predicted_cost"] = self.predicted_cost
        data["comparison"] = None if self.comparison is None else self.comparison.to_dict()
        data["eval_source"] = self.eval_source
        data["calibration"] = self.calibration
        data["fit_check"] = None if self.fit_check is None else self.fit_check.to_dict()
        data["rounds"] = [r.to_dict() for r in self.rounds]
        data["exports"] = {name: check.to_dict() for name, check in self.exports.items()}
        if self.latency is not None:
            data["latency"] = self.latency.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobMetrics:
        uniform, check = data.get("uniform"), data.get("plan_check")
        comparison, fit_check = data.get("comparison"), data.get("fit_check")
        return cls(
            primary=data["primary"],
            fp32=dict(data["fp32"]),
            quantized=dict(data["quantized"]),
            uniform=None if uniform is None else UniformScores.from_dict(uniform),
            uniform_widths=tuple(
                UniformScores.from_dict(u) for u in data.get("uniform_widths", ())
            ),
            weight_rules=dict(data.get("weight_rules") or {}),
            act_rules=data.get("act_rules"),
            plan_check=None if check is None else PlanCheck.from_dict(check),
            float_layers=tuple(FloatLayer.from_dict(f) for f in data.get("float_layers", ())),
            predicted_cost=data.get("predicted_cost"),
            comparison=None if comparison is None else Comparison.from_dict(comparison),
            eval_source=data.get("eval_source", "eval"),
            calibration=data.get("calibration", "fp32"),
            fit_check=None if fit_check is None else FitCheck.from_dict(fit_check),
            rounds=tuple(PlanRound.from_dict(r) for r in data.get("rounds", ())),
            exports={
                name: ExportCheck.from_dict(check)
                for name, check in (data.get("exports") or {}).items()
            },
            latency=None
            if data.get("latency") is None
            else LatencyFigures.from_dict(data["latency"]),
        )
