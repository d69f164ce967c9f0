"""Which clipping and rounding rules each width uses, chosen by the whole network's output.

Per layer, bitplan picks clipping (max / MSE) and rounding (nearest / GPTQ) by the error at that
layer's output on the calibration samples. That criterion is blind to two things: GPTQ is fitted
to those same samples, and a clipped (saturated) channel costs more downstream than its share of
the layer's output error says. On CIFAR ResNet56 it chose MSE clipping with GPTQ for nearly
every layer, and uniform W3 scored clearly below max clipping with GPTQ, whose outputs also stay
closer to FP32 on held-out samples (the figures: docs/design.md, from `python bench/quality.py
--models resnet56`).

So each width's rules are decided once more at the network level: for every rule set in
`RULE_SETS`, the uniform model at that width (pinned layers at their pin) runs on held-out
calibration samples, ones the statistics were not gathered on, and the set whose outputs
diverge least from FP32 (KL for classifiers, 1 - cosine for embeddings) is used for that width
in every plan. Per-layer selection stays the default and wins ties; the other sets are the
plain rules it is measured against. Costs one forward pass per width and set over the held-out
samples, and no more quantization work: the sets share their candidates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from allocator.costs import ROUNDINGS, QuantChoice, RuleSet
from allocator.layers import LayerTable
from allocator.quant.weight import CLIP_RULES
from allocator.sensitivity.measured import mean_divergence, quantized_layers
from allocator.zoo.base import Inputs, LoadedModel

PER_LAYER = "per-layer"
RULE_SETS: dict[str, RuleSet] = {
    PER_LAYER: (tuple(CLIP_RULES), ROUNDINGS),
    "max+gptq": (("max",), ("gptq",)),
    "max+nearest": (("max",), ("nearest",)),
}
"""Rule sets compared per width; the first is the default and wins ties."""

Choices = dict[tuple[str, int], QuantChoice]


@dataclass(frozen=True)
class RuleSelection:
    """The rule set each width uses, and the held-out divergence of every set that was tried."""

    chosen: dict[int, str]
    divergence: dict[int, dict[str, float]]

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {
            str(b): {"chosen": self.chosen[b], "divergence": self.divergence[b]}
            for b in sorted(self.divergence)
        }

    def to_state(self) -> dict[str, Any]:
        """Every field, `chosen` included where no divergence was measured (`allocator.cache`)."""
        return {"chosen": dict(self.chosen), "divergence": dict(self.divergence)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RuleSelection:
        return cls(dict(state["chosen"]), {b: dict(d) for b, d in state["divergence"].items()})


def select_rules(
    model: LoadedModel,
    table: LayerTable,
    candidates: Mapping[str, Choices],
    holdout: Sequence[Inputs],
    reference: Sequence[torch.Tensor],
) -> tuple[Choices, RuleSelection]:
    """Per width, the rule set whose uniform model stays closest to the FP32 `reference`
    outputs on `holdout`; returns the merged choices (every key from its width's set) and what
    was measured."""
    default = candidates[PER_LAYER]
    widths = sorted({b for _, b in default if b < 16})
    divergences: dict[int, dict[str, float]] = {}
    if holdout and len(candidates) > 1:
        for b in widths:
            plan = table.uniform(b)
            divergences[b] = {
                name: divergence_from_fp32(
                    model, holdout, reference, _uniform(plan, b, choices, default)
                )
                for name, choices in candidates.items()
                if all((layer, b) in choices for layer in plan)
            }
    chosen = {b: min(d, key=d.__getitem__) for b, d in divergences.items()}
    merged = {key: candidates[chosen.get(key[1], PER_LAYER)][key] for key in default}
    return merged, RuleSelection(chosen, divergences)


def _uniform(plan: Mapping[str, int], b: int, choices: Choices, default: Choices) -> Choices:
    """Free layers from `choices` at `b`; pinned layers keep the default rules at their pin."""
    return {
        layer: (choices if width == b else default)[(layer, width)] for layer, width in plan.items()
    }


def fp32_outputs(model: LoadedModel, batches: Sequence[Inputs]) -> list[torch.Tensor]:
    """The FP32 model's outputs on `batches`, on the CPU with the batches (a GPU keeps only
    the batch being compared, `mean_divergence`)."""
    with torch.inference_mode():
        return [model(inputs).cpu() for inputs in batches]


def divergence_from_fp32(
    model: LoadedModel,
    batches: Sequence[Inputs],
    reference: Sequence[torch.Tensor],
    layers: Mapping[str, QuantChoice],
) -> float:
    """Mean divergence over `batches` of the model with `layers` quantized from its FP32
    `reference` outputs (the model is restored afterwards)."""
    with quantized_layers(model.module, layers):
        return mean_divergence(model, batches, reference)
