"""The bit plan: the one value that says how a model is quantized.

The solver produces it, `apply` and `pack` consume it, the service stores it as JSON and a packed
artifact carries it in its metadata. Keeping it a plain frozen value (like a torchao config) means
what was applied can always be read back and re-applied, with no model pass.

Imports only the weight quantizer's registry (to validate names); never torch modules or services.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from allocator.quant.weight import check_config


@dataclass(frozen=True)
class LayerPlan:
    """How one weight layer is stored.

    `bias_correction` is added to the layer's bias, one float per output channel; it compensates
    the mean output shift that quantizing the weight causes.
    """

    weight_bits: int
    clip: str = "max"
    bias_correction: list[float] | None = None
    rounding: str = "nearest"
    """How codes were picked on the grid: "nearest", or "gptq" (error feedback on calibration
    data); informational, the codes themselves are what the artifact stores."""

    def __post_init__(self) -> None:
        check_config(self.weight_bits, self.clip)


@dataclass(frozen=True)
class BitPlan:
    """Per-layer weight entries keyed by layer name, activation entries per site, free-form meta.

    `activations` is reserved for activation quantization (site -> bits, quantizer kind, ...);
    `meta` records where the plan came from (model ref, budget, method, ...). Both must hold
    JSON values only, so `to_dict()` is always `json.dumps`-able.
    """

    layers: dict[str, LayerPlan]
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bits(
        cls, bits: Mapping[str, int], clip: str = "max", meta: Mapping[str, Any] | None = None
    ) -> BitPlan:
        """The plan for a solver's answer (layer name -> bits) with one clip rule everywhere."""
        return cls(
            layers={name: LayerPlan(weight_bits=b, clip=clip) for name, b in bits.items()},
            meta=dict(meta or {}),
        )

    @property
    def weight_bits(self) -> dict[str, int]:
        """Layer name -> bits, the shape `LayerTable.storage_bits` takes."""
        return {name: entry.weight_bits for name, entry in self.layers.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": {name: asdict(entry) for name, entry in self.layers.items()},
            "activations": copy.deepcopy(self.activations),
            "meta": copy.deepcopy(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitPlan:
        unknown = set(data) - {"layers", "activations", "meta"}
        if unknown:
            raise ValueError(f"unknown bit plan fields: {sorted(unknown)}")
        return cls(
            layers={name: LayerPlan(**entry) for name, entry in data["layers"].items()},
            activations=copy.deepcopy(dict(data.get("activations", {}))),
            meta=copy.deepcopy(dict(data.get("meta", {}))),
        )
