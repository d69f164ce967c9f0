"""What a job measured: the scores of FP32, of the returned plan and of the uniform plans, and
the checks behind the plan, as typed values whose `to_dict()` is the `metrics` object clients read.

Torch-free for the same reason as `allocator.job` (which holds the `Result` these sit in).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
class PlanCheck:
    """How far the solver's plan (`mixed`) and the uniform plan of the same size moved from FP32
    on held-out samples, and the one the job `kept` ("mixed" or "uniform")."""

    mixed: float
    uniform: float
    kept: str

    def to_dict(self) -> dict[str, Any]:
        return {"mixed": self.mixed, "uniform": self.uniform, "kept": self.kept}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanCheck:
        return cls(data["mixed"], data["uniform"], data["kept"])


@dataclass(frozen=True)
class FloatLayer:
    """A weight layer bitplan leaves in float, and why (a line a user can act on)."""

    name: str
    type: str
    params: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "params": self.params, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FloatLayer:
        return cls(data["name"], data["type"], data["params"], data["reason"])


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
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobMetrics:
        uniform, check = data.get("uniform"), data.get("plan_check")
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
        )
