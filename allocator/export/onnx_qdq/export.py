"""`export_onnx`: trace the quantized model with its markers, rewrite them, stamp the metadata.

The steps live in the sibling modules (tracing, weights, activations, graph); this one orders
them and refuses an export whose traced graph lost a planned weight for a reason other than
the tracer pruning a layer whose output the model drops.

Imports torch and onnx.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
from onnx import helper

from allocator.activations import instrument
from allocator.apply import PackedArtifact
from allocator.errors import ExportRefused
from allocator.export.onnx_qdq.activations import (
    SiteStorage,
    check_exportable,
    mark_activations,
    plan_sites,
    replace_activation,
)
from allocator.export.onnx_qdq.graph import (
    MARKER_DOMAIN,
    drop_unused_initializers,
    strip_prefix,
)
from allocator.export.onnx_qdq.integer_conv import fold_batchnorms, integer_biases
from allocator.export.onnx_qdq.tracing import (
    Traced,
    dynamic_axes,
    positional_inputs,
    replace_module,
    trace,
    unused_layers,
)
from allocator.export.onnx_qdq.weights import WeightStorage, mark_weights, replace_weights
from allocator.zoo.base import Inputs, LoadedModel

FORMAT = "bitplan-onnx-qdq-v1"
OPSET = 21
"""The opset written: the first whose DequantizeLinear takes INT4."""


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the file, its input names, and how each layer and site is
    stored (also in the model's metadata)."""

    path: Path
    inputs: tuple[str, ...]
    weights: dict[str, WeightStorage]
    activations: dict[str, SiteStorage]
    integer_conv: dict[str, list[str]]
    """The layers `allocator.export.onnx_qdq.integer_conv` rewrote ("folded_batchnorm",
    "int32_bias"; empty lists when not asked for)."""


def export_onnx(
    model: LoadedModel,
    packed: PackedArtifact,
    sample: Inputs,
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    integer_conv: bool = True,
) -> OnnxExport:
    """Write `model` (rebuilt from `packed` by `load_packed`) as a QDQ ONNX model at `path`,
    traced on `sample` (one model-ready batch) with a dynamic batch (and sequence) axis.

    `metadata` (the job id, ...) joins the plan and the storage tables in `metadata_props`.
    `integer_conv` rewrites convolutions for ONNX Runtime's integer kernels
    (`allocator.export.onnx_qdq.integer_conv`). Raises `ExportRefused` for a plan ONNX cannot
    express.
    """
    plan = packed.plan
    quantizers = check_exportable(plan.activations)
    path = Path(path)
    module = copy.deepcopy(model.module).eval()
    layers = dict(module.named_modules())
    mark_weights(layers, packed)
    names, tensors = positional_inputs(sample)
    # In eval mode for good: the exporter restores a module's own training flag after tracing,
    # and a new wrapper's is True, which would leave dropout on for the checks that follow.
    wrapper = Traced(replace_module(model, module), names).eval()
    sites = plan_sites(quantizers, layers)
    with tempfile.TemporaryDirectory(prefix="bitplan-onnx-") as tmp:
        traced = Path(tmp) / "traced.onnx"
        with instrument(module, sites, mark_activations(quantizers)):
            trace(
                wrapper,
                tensors,
                names,
                traced,
                dynamic_axes=dynamic_axes(names, tensors),
                custom_opsets={MARKER_DOMAIN: 1},
            )
        proto = onnx.load(str(traced))
    weights = replace_weights(proto, packed)
    missing = sorted(set(packed.codes) - set(weights))
    unused = unused_layers(wrapper, tensors, layers, missing)
    if len(unused) < len(missing):
        followed = [name for name in missing if name not in unused][:5]
        raise ExportRefused(
            f"the traced graph does not use the weights of {followed}: the model computes "
            "them in a way the exporter cannot follow"
        )
    # A dropped layer's input site goes with it: the model never uses what it quantizes.
    activations = {
        site.name: replace_activation(proto, site.name, quantizers[site.name])
        for site in sites
        if site.layer not in unused
    }
    codes = {storage.initializer: layer for layer, storage in weights.items()}
    rewritten: dict[str, list[str]] = {"folded_batchnorm": [], "int32_bias": []}
    if integer_conv:
        bits = {name: site.bits for name, site in activations.items()}
        rewritten["folded_batchnorm"] = fold_batchnorms(proto, codes, bits)
        rewritten["int32_bias"] = integer_biases(proto, codes, bits)
    strip_prefix(proto, "module.")
    drop_unused_initializers(proto)
    _raise_opset(proto)
    onnx.helper.set_model_props(
        proto,
        {
            "bitplan.format": FORMAT,
            "bitplan.plan": json.dumps(plan.to_dict()),
            "bitplan.weights": json.dumps({k: asdict(v) for k, v in weights.items()}),
            "bitplan.activations": json.dumps({k: asdict(v) for k, v in activations.items()}),
            "bitplan.unused_layers": json.dumps(unused),
            "bitplan.integer_conv": json.dumps(rewritten),
            **dict(metadata or {}),
        },
    )
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return OnnxExport(path, names, weights, activations, rewritten)


def _raise_opset(proto: onnx.ModelProto) -> None:
    """The traced graph at `OPSET`, without the marker domain: opset 21's changes to the ops
    the tracer emits only add types, so the graph means the same."""
    others = [o for o in proto.opset_import if o.domain not in ("", MARKER_DOMAIN, "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", OPSET), *others])
