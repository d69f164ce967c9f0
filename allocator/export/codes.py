"""The runtime's activation codes against bitplan's, site by site.

With quantized activations an exported model's outputs cannot be judged alone: ONNX Runtime
sums in another order, so an activation within float rounding of a code boundary takes the
neighbouring code, and that one step travels through every later layer. So each site's codes
are exposed as graph outputs, and bitplan's model runs with each site fed the runtime's own
codes, computing from them the codes of the sites after it: a site's differences are its own,
not inherited (`allocator.export.parity` decides with them).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor

from allocator.activations import instrument
from allocator.data import EvalSet
from allocator.errors import ParityFailed
from allocator.export.onnx_qdq import (
    OUTPUT_NAME,
    activation_codes,
    feeds,
    plan_sites,
    qdq_params,
)
from allocator.export.runtime import session
from allocator.quant.activation import ActQuantizer
from allocator.zoo.base import LoadedModel

CODE_FLIP_SHARE = 1e-2
"""The largest share of one site's activation codes allowed one step off the runtime's, given
the same codes at the sites before it (none may be further off). Float summation order alone
flipped at most 0.03 % of a site's codes; ONNX Runtime's integer convolutions (QLinearConv,
`allocator.export.onnx_qdq.integer_conv`) requantize their int32 sums with their own rounding,
after a bias rounded to int32: on EfficientNet-Lite1 W8A8 up to 0.52 % of a site's codes (a
1x1 projection's output), 0.15 % over all sites, none by more than a step. A wrong scale or
zero point moves most codes, many by more than a step."""
CODE_FLIP_FLOOR = 4
"""One step off is allowed at this many codes of a site whatever its share: a site of few codes
(a classifier's input, 128 codes on 16 samples) would otherwise fail on a single flip."""


@dataclass(frozen=True)
class SiteCodes:
    """The runtime's activation codes against bitplan's, each site given the runtime's codes
    at the sites before it (see the module docstring)."""

    sites: int
    codes: int
    """Codes compared, over every site and sample."""
    one_step: int
    """Codes one step off."""
    beyond: int
    """Codes more than one step off."""
    worst_site: str | None
    """The site with the largest share of codes off (None when none is)."""
    worst_share: float
    output_max_abs_diff: float
    """Largest difference of the final outputs when bitplan computes them from the runtime's
    codes."""
    sites_over: int = 0
    """Sites with more codes one step off than `flip_share` of theirs (and `CODE_FLIP_FLOOR`)."""
    flip_share: float = CODE_FLIP_SHARE

    @property
    def passed(self) -> bool:
        return self.beyond == 0 and self.sites_over == 0

    def text(self) -> str:
        where = (
            ""
            if self.worst_site is None
            else f", at most {self.worst_share:.2e} at {self.worst_site}"
        )
        return (
            f"site by site {self.one_step} of {self.codes} activation codes one step off and "
            f"{self.beyond} further{where} (allowed {self.flip_share:g} of a site's codes or "
            f"{CODE_FLIP_FLOOR}, none further; {self.sites_over} sites over), "
            f"outputs from the runtime's codes {self.output_max_abs_diff:.3g} off"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "sites": self.sites,
            "codes": self.codes,
            "one_step": self.one_step,
            "beyond": self.beyond,
            "worst_site": self.worst_site,
            "worst_share": self.worst_share,
            "output_max_abs_diff": self.output_max_abs_diff,
            "flip_share": self.flip_share,
            "sites_over": self.sites_over,
            "passed": self.passed,
        }


def site_codes(
    path: str | Path,
    names: Sequence[str],
    model: LoadedModel,
    quantizers: Mapping[str, ActQuantizer],
    evalset: EvalSet,
) -> SiteCodes:
    """Every activation site's codes in ONNX Runtime against those bitplan computes when each
    site before it holds the runtime's codes, over every batch of `evalset`."""
    proto = onnx.load(str(path))
    by_site = activation_codes(proto)
    tensors = [tensor for calls in by_site.values() for tensor in calls]
    for tensor in tensors:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    counts = {site: [0, 0, 0] for site in by_site}  # compared, one step off, further
    worst_output = 0.0
    sites = plan_sites(quantizers, dict(model.module.named_modules()))
    with tempfile.TemporaryDirectory(prefix="bitplan-codes-") as tmp:
        debug = Path(tmp) / "codes.onnx"
        onnx.save(proto, str(debug))
        runtime = session(debug)
        for batch in evalset.batches:
            values = runtime.run([OUTPUT_NAME, *tensors], feeds(names, batch))
            given = dict(zip(tensors, values[1:], strict=True))
            forced = _Forced(given, by_site, quantizers, counts)
            with torch.no_grad(), instrument(model.module, sites, forced):
                out = model(batch).float()
            gap = (torch.from_numpy(values[0]).float() - out).abs().max()
            worst_output = max(worst_output, float(gap))
    shares = {site: (c[1] + c[2]) / c[0] for site, c in counts.items() if c[0]}
    over = [
        site
        for site, c in counts.items()
        if c[1] + c[2] > max(CODE_FLIP_SHARE * c[0], CODE_FLIP_FLOOR)
    ]
    worst = max(shares, key=shares.__getitem__) if any(shares.values()) else None
    return SiteCodes(
        sites=len(by_site),
        codes=sum(c[0] for c in counts.values()),
        one_step=sum(c[1] for c in counts.values()),
        beyond=sum(c[2] for c in counts.values()),
        worst_site=worst,
        worst_share=0.0 if worst is None else shares[worst],
        output_max_abs_diff=worst_output,
        sites_over=len(over),
    )


class _Forced:
    """The transform that feeds each site the runtime's codes of one batch, counting how far
    bitplan's own codes at that site are from them."""

    def __init__(
        self,
        given: Mapping[str, np.ndarray],
        names: Mapping[str, list[str]],
        quantizers: Mapping[str, ActQuantizer],
        counts: dict[str, list[int]],
    ) -> None:
        self.given, self.names, self.quantizers, self.counts = given, names, quantizers, counts
        self.calls: dict[str, int] = {}

    def __call__(self, site: str, x: Tensor) -> Tensor:
        if site not in self.names:  # the input of a layer whose output the model drops
            return self.quantizers[site](x)
        index = self.calls.get(site, 0)
        self.calls[site] = index + 1
        theirs = torch.from_numpy(self.given[self.names[site][index]].astype(np.int64))
        scale, zero, levels = _grid(self.quantizers[site])
        ours = torch.clamp(torch.round(x / scale) + zero, 0, levels).to(torch.int64)
        if ours.shape != theirs.shape:
            raise ParityFailed(
                f"activation site {site}: {tuple(theirs.shape)} codes in ONNX, "
                f"{tuple(ours.shape)} in bitplan"
            )
        off = (ours - theirs).abs()
        count = self.counts[site]
        count[0] += off.numel()
        count[1] += int((off == 1).sum())
        count[2] += int((off > 1).sum())
        return ((theirs - zero) * scale).to(x.dtype)


def _grid(quantizer: ActQuantizer) -> tuple[Tensor, Tensor, int]:
    """(scale, zero point, largest code) of the QDQ pair the export wrote for `quantizer`."""
    qdq = qdq_params(quantizer)
    scale = torch.from_numpy(qdq.scale)
    return scale, torch.from_numpy(qdq.zero_point.astype(np.int64)), 2**quantizer.bits - 1
