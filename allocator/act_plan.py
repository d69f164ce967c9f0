"""Which quantizer each activation site gets, at which width: presets from the seed papers, or
the one with the least error at the layer's output on calibration data.

Presets (`--act-quantizers`):
- `baseline`: per-tensor min-max everywhere (what the papers compare with);
- `repq`: RepQ-ViT, per-channel (reparameterized) post-LayerNorm and log-sqrt2 post-Softmax;
- `isvit`: I&S-ViT's shift-uniform-log2 post-Softmax, per-channel post-LayerNorm;
- `log2`: per-channel post-LayerNorm and plain log2 post-Softmax (the ablation's middle step);
- `auto` (default): every site takes the candidate of its role with the least calibration error
  at the consuming layer's output, ||W (x^ - x)||^2 for a linear layer's input (a conv input
  or the probabilities: the activation's own squared error). Weighting by W is what matters:
  a channel the next layer ignores may be clipped hard.
The first and last layers' inputs stay at 8 bits or more, as their weights do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from allocator.activations import Site, collect, find_sites
from allocator.errors import UnknownMethod
from allocator.layers import LayerTable
from allocator.quant.activation import NOT_QUANTIZED, ActQuantizer, calibrate
from allocator.zoo.base import Inputs, LoadedModel

CANDIDATES: dict[str, tuple[str, ...]] = {
    "post-ln": ("minmax", "percentile", "mse", "channel"),
    "post-softmax": ("minmax", "log2", "logsqrt2", "sulq"),
    "post-gelu": ("minmax", "percentile", "mse"),
    "input": ("minmax", "percentile", "mse"),
    "other": ("minmax", "percentile", "mse"),
}
PRESETS: dict[str, dict[str, str]] = {
    "baseline": {},
    "repq": {"post-ln": "channel", "post-softmax": "logsqrt2"},
    "isvit": {"post-ln": "channel", "post-softmax": "sulq"},
    "log2": {"post-ln": "channel", "post-softmax": "log2"},
}
ACT_QUANTIZERS = (*PRESETS, "auto")
PINNED_ACT_BITS = 8
PROBS_ACT_BITS = 8
"""Width of attention probabilities under joint allocation: they feed no layer of the table,
so the integer program does not choose it."""
REFERENCE_WEIGHT_BITS = 4
ERROR_ROWS = 4096
"""Rows (spread over all calibration batches) each candidate's error is measured on."""


@dataclass(frozen=True)
class ActAssignment:
    """One site's width and calibrated quantizer, as the result and the artifact record it."""

    site: Site
    quantizer: ActQuantizer

    def to_dict(self) -> dict[str, object]:
        return {
            "site": self.site.name,
            "role": self.site.role,
            "act_bits": self.quantizer.bits,
            "quantizer": self.quantizer.kind,
            "macs": self.site.macs,
        }


class ActivationBench:
    """A model's activation sites with their calibration samples, ready to quantize at any
    widths with any preset; built once per job, like the weight statistics."""

    def __init__(self, model: LoadedModel, batches: Sequence[Inputs], table: LayerTable) -> None:
        self.table = table
        self.sites = find_sites(model, batches[0], table)
        self.samples = collect(model, batches, self.sites)
        self._modules = dict(model.module.named_modules())
        self._pinned = {layer.name for layer in table if layer.pinned_bits is not None}
        self._cache: dict[tuple[str, str, int], tuple[ActQuantizer, float]] = {}

    def assign(self, widths: int | Mapping[str, int], preset: str = "auto") -> list[ActAssignment]:
        """Each site's quantizer at its width (one width for all, or per site name)."""
        if preset not in ACT_QUANTIZERS:
            raise UnknownMethod(
                f"unknown activation quantizers {preset!r}; use one of {', '.join(ACT_QUANTIZERS)}"
            )
        assignments = []
        for site in self.sites:
            bits = widths if isinstance(widths, int) else widths[site.name]
            if site.layer in self._pinned:
                bits = max(bits, PINNED_ACT_BITS)
            assignments.append(ActAssignment(site, self._choose(site, bits, preset)))
        return assignments

    def joint_cost(
        self,
        weight_cost: np.ndarray,
        bits: Sequence[int],
        weight_error: Mapping[tuple[str, int], float],
        act_bits: Sequence[int],
        preset: str,
    ) -> np.ndarray:
        """The cost table over (weight width, activation width) pairs, weight-major.

        cost(l, w, a) = cost(l, w) + s_l * e_a(l, a): s_l is the sensitivity the weight cost
        implies, cost(l, w_ref) / e_w(l, w_ref) at w_ref = 4 bits (both are relative output
        errors, so the same sensitivity prices both), and e_a the relative output error of the
        layer's input quantized at a bits with the quantizer `preset` gives it. Weight and
        activation errors are taken as independent, so they add.
        """
        reference = REFERENCE_WEIGHT_BITS if REFERENCE_WEIGHT_BITS in bits else bits[len(bits) // 2]
        column = list(bits).index(reference)
        sites = {site.layer: site for site in self.sites if site.layer is not None}
        rows = []
        for i, layer in enumerate(self.table):
            error = weight_error.get((layer.name, reference), 0.0)
            scale = weight_cost[i, column] / error if error > 0 else 0.0
            act = np.array([self._act_error(sites[layer.name], a, preset) for a in act_bits])
            rows.append((weight_cost[i][:, None] + scale * act[None, :]).ravel())
        return np.array(rows)

    def _act_error(self, site: Site, bits: int, preset: str) -> float:
        if bits >= NOT_QUANTIZED:
            return 0.0
        return self.error(site, self._choose(site, bits, preset).kind, bits)

    def error(self, site: Site, kind: str, bits: int) -> float:
        """Calibration error of `kind` at `bits` on `site`, relative to the clean output energy."""
        return self._fit(site, kind, bits)[1]

    def _choose(self, site: Site, bits: int, preset: str) -> ActQuantizer:
        if preset == "auto":
            kind = min(CANDIDATES[site.role], key=lambda k: self.error(site, k, bits))
        else:
            kind = PRESETS[preset].get(site.role, "minmax")
        return self._fit(site, kind, bits)[0]

    def _fit(self, site: Site, kind: str, bits: int) -> tuple[ActQuantizer, float]:
        key = (site.name, kind, bits)
        if key not in self._cache:
            x = self.samples[site.name]
            quantizer = calibrate(kind, x, bits)
            # Calibration sees every sampled row; the error that ranks candidates needs fewer.
            rows = x[:: max(1, len(x) // ERROR_ROWS)][:ERROR_ROWS]
            self._cache[key] = (quantizer, self._relative_error(site, rows, quantizer(rows) - rows))
        return self._cache[key]

    def _relative_error(self, site: Site, x: torch.Tensor, delta: torch.Tensor) -> float:
        layer = self._modules.get(site.layer) if site.layer else None
        if isinstance(layer, nn.Linear):
            weight = layer.weight.detach()
            return float(
                (delta @ weight.T).pow(2).sum() / (x @ weight.T).pow(2).sum().clamp_min(1e-30)
            )
        return float(delta.pow(2).sum() / x.pow(2).sum().clamp_min(1e-30))


def quantizers(assignments: Sequence[ActAssignment]) -> dict[str, ActQuantizer]:
    return {a.site.name: a.quantizer for a in assignments}
