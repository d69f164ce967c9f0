"""Quantized activation sites as `[Clip ->] QuantizeLinear -> DequantizeLinear`.

Only per-tensor uniform quantizers have that form (see the package docstring for the ones
refused and why), so a plan is checked before anything is traced. Each site's call is traced
as a `bitplan::Activation` marker whose eager forward is bitplan's own quantizer, then
rewritten with the quantizer's scale and zero point; the codes tensors are named so that a
parity check can find every call's codes again (`activation_codes`).

Imports torch and onnx.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from allocator.activations import CHANNELS_FIRST, Site
from allocator.errors import ExportRefused
from allocator.export.onnx_qdq.graph import MARKER_DOMAIN, attribute, marker_nodes, swap
from allocator.quant.activation import CHANNEL_KINDS, NOT_QUANTIZED, UNIFORM_KINDS, ActQuantizer

UINT8_LEVELS = 255
ACTIVATION_CODES = re.compile(r"(?P<site>.+)\.act(?:_(?P<call>\d+))?_quantized")
"""The name `replace_activation` gives the codes of a site's call (`activation_codes`)."""


@dataclass(frozen=True)
class SiteStorage:
    """How one quantized activation site is expressed."""

    kind: str
    bits: int
    type: str
    """The QuantizeLinear output type: "UINT8" at every width (see the package docstring)."""
    clipped: bool
    """True when a Clip (or Max/Min) keeps the codes to the plan's 2^b levels, because the
    type's own saturation does not."""


@dataclass(frozen=True)
class QDQParams:
    """The initializer values of one site's QDQ nodes; `low`/`high` only below 8 bits."""

    scale: np.ndarray
    zero_point: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None


def check_exportable(activations: Mapping[str, Mapping[str, Any]]) -> dict[str, ActQuantizer]:
    """The plan's activation quantizers, rebuilt from its `activations` entries; a site whose
    quantizer has no standard-op form is refused, naming the site and why."""
    quantizers = {}
    for site, entry in activations.items():
        quantizer = ActQuantizer.from_dict(entry.get("params", entry))
        if quantizer.bits >= NOT_QUANTIZED:
            continue
        if quantizer.kind in CHANNEL_KINDS:
            raise ExportRefused(
                f"activation site {site} uses the {quantizer.kind} quantizer (RepQ-ViT's "
                "per-channel ranges, which bitplan runs unfolded): ONNX Runtime fuses per-axis "
                "activation QDQ into MatMulIntegerToFloat, which fails on per-channel zero "
                "points; export a plan made with per-tensor activation quantizers "
                "(--act-quantizers baseline)"
            )
        if quantizer.kind not in UNIFORM_KINDS:
            raise ExportRefused(
                f"activation site {site} uses the {quantizer.kind} quantizer, which is not "
                "uniform: ONNX QuantizeLinear has no form for it; export a plan made with "
                "uniform activation quantizers (--act-quantizers baseline)"
            )
        quantizers[site] = quantizer
    return quantizers


def plan_sites(names: Iterable[str], modules: Mapping[str, nn.Module]) -> list[Site]:
    """The activation sites a plan names: a layer's input (the layer's own name), or
    `<attention module>.probs`; a name the model lacks is refused."""
    sites = []
    for name in names:
        if name in modules:
            axis = 1 if isinstance(modules[name], CHANNELS_FIRST) else -1
            sites.append(Site(name, "other", name, 0, axis))
        elif name.endswith(".probs") and name.removesuffix(".probs") in modules:
            sites.append(Site(name, "post-softmax", None, 0))
        else:
            raise ExportRefused(f"the plan quantizes activation site {name}, which the model lacks")
    return sites


def mark_activations(quantizers: Mapping[str, ActQuantizer]) -> Callable[[str, Tensor], Tensor]:
    """The `instrument` transform that routes each site through its `bitplan::Activation`
    marker: the site's own quantizer in eager mode, a node the rewrite finds when traced."""

    def transform(site: str, x: Tensor) -> Tensor:
        return _activation_marker(site, quantizers[site]).apply(x)

    return transform


def _activation_marker(site: str, quantizer: ActQuantizer) -> type[torch.autograd.Function]:
    class Activation(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            return quantizer(x)

        @staticmethod
        def symbolic(g: Any, x: Any) -> Any:
            out = g.op(f"{MARKER_DOMAIN}::Activation", x, site_s=site)
            return out.setType(x.type())

    return Activation


def replace_activation(proto: onnx.ModelProto, site: str, quantizer: ActQuantizer) -> SiteStorage:
    """The `bitplan::Activation` markers of `site` (one per call of its layer) become
    [Clip ->] QuantizeLinear -> DequantizeLinear with the quantizer's own scale and zero point."""
    graph = proto.graph
    markers = [n for n in marker_nodes(graph, "Activation") if attribute(n, "site") == site]
    if not markers:
        raise ExportRefused(f"activation site {site} does not appear in the traced graph")
    qdq = qdq_params(quantizer)
    for index, node in enumerate(markers):
        prefix = f"{site}.act{'' if index == 0 else f'_{index}'}"
        nodes, inits = qdq_nodes(prefix, node.input[0], node.output[0], qdq)
        swap(graph, node, nodes)
        graph.initializer.extend(inits)
    return SiteStorage(quantizer.kind, quantizer.bits, "UINT8", qdq.low is not None)


def qdq_params(quantizer: ActQuantizer) -> QDQParams:
    """Scale, zero point and clip bounds that make QuantizeLinear -> DequantizeLinear compute
    the per-tensor `ActQuantizer` exactly: scale and zero point in float32 as
    `allocator.quant.activation._uniform` computes them (its range holds 0, so the zero point
    is in [0, 2^b - 1]); codes round(x / s) + z kept to [0, 2^b - 1] by UINT8's saturation at 8
    bits, below that by clipping x to [-z s, (2^b - 1 - z) s] first (the same codes, since
    round((-z s) / s) = -z)."""
    levels = 2**quantizer.bits - 1
    lo, hi = quantizer.lo.float(), quantizer.hi.float()
    scale = torch.clamp((hi - lo) / levels, min=1e-12)
    zero = torch.round(-lo / scale)
    low = high = None
    if levels != UINT8_LEVELS:
        low, high = ((-zero) * scale).numpy(), ((levels - zero) * scale).numpy()
    return QDQParams(scale.numpy().astype(np.float32), zero.numpy().astype(np.uint8), low, high)


def qdq_nodes(
    prefix: str, source: str, output: str, qdq: QDQParams
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """`[Clip ->] QuantizeLinear -> DequantizeLinear` from `source` to `output`, its tensors
    named after `prefix` (the codes `<prefix>_quantized`, as `ACTIVATION_CODES` reads them)."""
    names = {k: f"{prefix}_{k}" for k in ("scale", "zero_point", "low", "high")}
    inits = [
        numpy_helper.from_array(qdq.scale, names["scale"]),
        numpy_helper.from_array(qdq.zero_point, names["zero_point"]),
    ]
    nodes = []
    clipped = source
    if qdq.low is not None and qdq.high is not None:
        clipped = f"{prefix}_clipped"
        inits += [
            numpy_helper.from_array(qdq.low.astype(np.float32), names["low"]),
            numpy_helper.from_array(qdq.high.astype(np.float32), names["high"]),
        ]
        nodes.append(helper.make_node("Clip", [source, names["low"], names["high"]], [clipped]))
    quantized = f"{prefix}_quantized"
    nodes.append(
        helper.make_node(
            "QuantizeLinear", [clipped, names["scale"], names["zero_point"]], [quantized]
        )
    )
    nodes.append(
        helper.make_node(
            "DequantizeLinear", [quantized, names["scale"], names["zero_point"]], [output]
        )
    )
    return nodes, inits


def activation_codes(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """Activation site -> the tensors holding its codes (QuantizeLinear outputs), one per call
    of the site in graph order, as `replace_activation` names them."""
    codes: dict[str, list[tuple[int, str]]] = {}
    for node in proto.graph.node:
        match = (
            ACTIVATION_CODES.fullmatch(node.output[0]) if node.op_type == "QuantizeLinear" else None
        )
        if match is not None:
            codes.setdefault(match["site"], []).append((int(match["call"] or 0), node.output[0]))
    return {site: [name for _, name in sorted(calls)] for site, calls in codes.items()}
