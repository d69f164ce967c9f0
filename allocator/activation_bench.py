"""Which quantizer each activation site gets, at which width: presets from the seed papers, or
the one with the least error at the layer's output on calibration data.

Presets (`--act-quantizers`):
- `baseline`: per-tensor min-max everywhere (what the papers compare with);
- `repq`: RepQ-ViT, per-channel (reparameterized) post-LayerNorm and log-sqrt2 post-Softmax;
- `isvit`: I&S-ViT's shift-uniform-log2 post-Softmax, per-channel post-LayerNorm;
- `dopq`: DopQ-ViT's TanQ post-Softmax, per-channel post-LayerNorm (its median target, MOSF,
  only differs from RepQ's mean once folded: `allocator.quant.reparam`);
- `log2`: per-channel post-LayerNorm and plain log2 post-Softmax (the ablation's middle step);
- `auto` (default): per width, each role's quantizer is the candidate whose model (every site
  quantized at that width) diverges least from FP32 on held-out calibration samples; a role
  may also keep "per-site", where each site takes its candidate with the least calibration
  error at the consuming layer's output, ||W (x^ - x)||^2 for a linear layer's input (a conv
  input or the probabilities: the activation's own squared error). Without held-out samples,
  per-site is all there is.
Why both: the per-site error ranks well within a role (weighting by W matters: a channel the
next layer ignores may be clipped hard) but not across a role's kinds. On MiniLM it picked
min-max for the post-GELU activations, whose outliers then cost every other value its
resolution; the percentile clip diverges far less from FP32 on held-out samples and scores
better (the figures: docs/benchmarks.md, from `python bench/quality.py --act --models minilm`).
The held-out selection is the same lesson as the weights' (`allocator.weight_rules`), at the
granularity that fixed it there: one choice per role and width, measured on the whole network.
The first and last layers' inputs stay at 8 bits or more, as their weights do, with their
per-site choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from allocator.activations import Site, collect, find_sites, quantized_activations
from allocator.errors import UnknownMethod
from allocator.job import ACT_QUANTIZERS, JointActs
from allocator.layers import LayerTable
from allocator.quant.activation import NOT_QUANTIZED, ActQuantizer, calibrate
from allocator.sensitivity.measured import mean_divergence
from allocator.zoo.base import Inputs, LoadedModel

CANDIDATES: dict[str, tuple[str, ...]] = {
    "post-ln": ("minmax", "percentile", "mse", "channel", "channel-clip"),
    "post-softmax": ("minmax", "log2", "logsqrt2", "sulq", "tanq"),
    "post-gelu": ("minmax", "percentile", "mse"),
    "input": ("minmax", "percentile", "mse"),
    "other": ("minmax", "percentile", "mse"),
}
PRESETS: dict[str, dict[str, str]] = {
    "baseline": {},
    "repq": {"post-ln": "channel", "post-softmax": "logsqrt2"},
    "isvit": {"post-ln": "channel", "post-softmax": "sulq"},
    "dopq": {"post-ln": "channel", "post-softmax": "tanq"},
    "log2": {"post-ln": "channel", "post-softmax": "log2"},
}
AUTO = "auto"
"""The preset that chooses each role's quantizer by measurement; `ACT_QUANTIZERS` (the names a
spec may give) are the keys of `PRESETS` and this."""
PER_SITE = "per-site"
"""`auto`'s option of keeping, for a role, each site's least-error candidate."""
PINNED_ACT_BITS = 8
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
    widths with any preset; built once per job, like the weight statistics.

    `holdout` and its FP32 `reference` outputs (disjoint from `batches`) let `auto` choose each
    role's quantizer on the whole network; without them `auto` is per-site."""

    def __init__(
        self,
        model: LoadedModel,
        batches: Sequence[Inputs],
        table: LayerTable,
        holdout: Sequence[Inputs] = (),
        reference: Sequence[torch.Tensor] = (),
    ) -> None:
        self.table = table
        self.model = model
        self.sites = find_sites(model, batches[0], table)
        self.samples = collect(model, batches, self.sites)
        self.holdout = list(holdout)
        self.reference = list(reference)
        self.role_divergence: dict[int, dict[str, dict[str, float]]] = {}
        """Per width and role, the held-out divergence of every option `auto` measured."""
        self._modules = dict(model.module.named_modules())
        self._pinned = {layer.name for layer in table if layer.pinned_bits is not None}
        self._cache: dict[tuple[str, str, int], tuple[ActQuantizer, float]] = {}
        self._role_kinds: dict[int, dict[str, str]] = {}

    def assign(self, widths: int | Mapping[str, int], preset: str = AUTO) -> list[ActAssignment]:
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
        acts: JointActs,
        preset: str,
    ) -> np.ndarray:
        """The cost table over (weight width, activation width of `acts`) pairs, weight-major.

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
            act = np.array([self._act_error(sites[layer.name], a, preset) for a in acts.widths])
            rows.append((weight_cost[i][:, None] + scale * act[None, :]).ravel())
        return np.array(rows)

    def _act_error(self, site: Site, bits: int, preset: str) -> float:
        if bits >= NOT_QUANTIZED:
            return 0.0
        return self.error(site, self._choose(site, bits, preset).kind, bits)

    def error(self, site: Site, kind: str, bits: int) -> float:
        """Calibration error of `kind` at `bits` on `site`, relative to the clean output energy."""
        return self._fit(site, kind, bits)[1]

    def role_kinds(self, bits: int) -> dict[str, str]:
        """The roles whose `auto` quantizer at `bits` is one kind for all their sites (the
        others are per-site), chosen on held-out samples the first time a width is asked."""
        if bits >= NOT_QUANTIZED or not self.holdout:
            return {}
        if bits not in self._role_kinds:
            self._role_kinds[bits] = self._select_roles(bits)
        return self._role_kinds[bits]

    def rules_to_dict(self) -> dict[str, dict[str, object]]:
        """Per width `auto` chose at: each role's kind (or per-site) and what was measured."""
        return {
            str(b): {
                "chosen": {
                    role: self._role_kinds[b].get(role, PER_SITE)
                    for role in self.role_divergence[b]
                },
                "divergence": self.role_divergence[b],
            }
            for b in sorted(self.role_divergence)
        }

    def _select_roles(self, bits: int) -> dict[str, str]:
        """One role at a time, in `CANDIDATES` order, each option measured with the roles
        before it at their chosen kinds; per-site goes first and wins ties."""
        chosen: dict[str, str] = {}
        measured: dict[str, dict[str, float]] = {}
        roles = [role for role in CANDIDATES if any(site.role == role for site in self.sites)]
        for role in roles:
            options = {PER_SITE: chosen, **{k: {**chosen, role: k} for k in CANDIDATES[role]}}
            measured[role] = {
                name: self._holdout_divergence(bits, kinds) for name, kinds in options.items()
            }
            best = min(measured[role], key=measured[role].__getitem__)
            chosen = options[best]
        self.role_divergence[bits] = measured
        return chosen

    def _holdout_divergence(self, bits: int, kinds: Mapping[str, str]) -> float:
        active = {}
        for site in self.sites:
            width = max(bits, PINNED_ACT_BITS) if site.layer in self._pinned else bits
            kind = kinds.get(site.role) if site.layer not in self._pinned else None
            active[site.name] = self._fit(site, kind or self._per_site(site, width), width)[0]
        with quantized_activations(self.model.module, self.sites, active):
            return mean_divergence(self.model, self.holdout, self.reference)

    def _per_site(self, site: Site, bits: int) -> str:
        return min(CANDIDATES[site.role], key=lambda k: self.error(site, k, bits))

    def _choose(self, site: Site, bits: int, preset: str) -> ActQuantizer:
        if preset == AUTO:
            role_kind = None if site.layer in self._pinned else self.role_kinds(bits).get(site.role)
            kind = role_kind or self._per_site(site, bits)
        else:
            kind = PRESETS[preset].get(site.role, "minmax")
        return self._fit(site, kind, bits)[0]

    def _fit(self, site: Site, kind: str, bits: int) -> tuple[ActQuantizer, float]:
        key = (site.name, kind, bits)
        if key not in self._cache:
            x = self.samples[site.name]
            quantizer = calibrate(kind, x, bits, site.channel_axis)
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


def joint_widths(
    sites: Sequence[Site], layer_bits: Mapping[str, int], probs_bits: int
) -> dict[str, int]:
    """Each site's width under joint allocation: its layer's chosen input width, `probs_bits`
    for attention probabilities."""
    return {site.name: layer_bits[site.layer] if site.layer else probs_bits for site in sites}


def quantizers(assignments: Sequence[ActAssignment]) -> dict[str, ActQuantizer]:
    return {a.site.name: a.quantizer for a in assignments}
