"""A packed artifact as an ONNX model in the standard QDQ layout.

Weights: each planned layer's weight is `DequantizeLinear(codes, scale, zero_point, axis)`
feeding the layer's own Conv / Gemm / MatMul, with per-output-channel float32 scales (the
artifact's float16 scales, widened exactly) and zero points 0 (bitplan's weight grid is
symmetric). The codes are the artifact's own integers, copied from `read_packed`, never a
re-quantization of float weights: INT4 initializers for layers of at most 4 bits (opset 21's
DequantizeLinear takes INT4 and ONNX Runtime's CPU kernel runs it), INT8 for 5 to 8 bits. A
16-bit layer is a FLOAT16 initializer cast to float. Linear weights are stored transposed,
(in, out) with `axis=1`, so DequantizeLinear feeds MatMul / Gemm directly as ONNX Runtime's own
quantizer lays them out.

Activations: at every site the plan quantizes, `QuantizeLinear -> DequantizeLinear` with the
plan's per-tensor scale and zero point (min-max, percentile and mse quantizers). Activations
stay UINT8 even at 4 bits, because integer kernels (QLinearConv, QLinearMatMul, MatMulInteger)
take 8-bit activations; a width below 8 bits clips first (`Clip`), so the codes a runtime sees
are exactly the plan's 2^b levels. Refused, with the site and the reason: softmax quantizers
that are not uniform (log2, log-sqrt2, shift-uniform-log2, tan: QuantizeLinear has no form for
them), and RepQ-ViT's per-channel ranges (`channel`, `channel-clip`): per-axis activation QDQ
is valid ONNX, but ONNX Runtime fuses it into MatMulIntegerToFloat, which then fails at run
time on per-channel zero points (bitplan runs these quantizers unfolded; folding them into the
LayerNorm and the next layer's weights would change the packed codes).

How: the quantized model (`allocator.apply.load_packed`) is traced by the TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`) with each planned weight and each quantized activation
routed through a marker op (`bitplan::Weight`, `bitplan::Activation`) whose eager forward is
bitplan's own computation; the markers are then replaced by the QDQ nodes above with `onnx`.
The tracer knows opsets up to 20; INT4 needs 21, whose changes to the ops it emits only add
types, so the opset is raised after tracing. The plan, the job id and the storage of every
layer and site are in the model's `metadata_props`.

Imports torch and onnx; never anything from the service, database or worker layers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn
from torch.nn.utils import parametrize

from allocator.activations import CHANNELS_FIRST, Site, instrument
from allocator.apply import PackedArtifact
from allocator.errors import ExportRefused
from allocator.quant.activation import CHANNEL_KINDS, NOT_QUANTIZED, UNIFORM_KINDS, ActQuantizer
from allocator.quant.weight import FLOAT_BITS
from allocator.zoo.base import Inputs, LoadedModel

FORMAT = "bitplan-onnx-qdq-v1"
OPSET = 21
TRACE_OPSET = 20
"""The highest opset the TorchScript exporter emits; raised to `OPSET` after tracing."""
UINT8_LEVELS = 255
INT4_MAX_BITS = 4
"""Codes of at most this many bits are stored as INT4, wider ones as INT8."""
MARKER_DOMAIN = "bitplan"
OUTPUT_NAME = "output"
ACTIVATION_CODES = re.compile(r"(?P<site>.+)\.act(?:_(?P<call>\d+))?_quantized")
"""The name `_replace_activation` gives the codes of a site's call (`activation_codes`)."""
IMAGE_INPUT = "input"


@dataclass(frozen=True)
class WeightStorage:
    """How one planned layer's weight is stored in the ONNX model."""

    initializer: str
    """The codes (or the float16 weight of a 16-bit layer)."""
    type: str
    """"INT4", "INT8" or "FLOAT16"."""
    bits: int
    axis: int | None
    """The DequantizeLinear axis of the per-channel scales; None for FLOAT16."""
    transposed: bool
    """True for a Linear weight stored (in, out), as MatMul reads it."""


@dataclass(frozen=True)
class SiteStorage:
    """How one quantized activation site is expressed."""

    kind: str
    bits: int
    type: str
    """The QuantizeLinear output type: "UINT8" at every width (see the module docstring)."""
    clipped: bool
    """True when a Clip (or Max/Min) keeps the codes to the plan's 2^b levels, because the
    type's own saturation does not."""


@dataclass(frozen=True)
class OnnxExport:
    """What `export_onnx` wrote: the file, its input names, and how each layer and site is
    stored (also in the model's metadata)."""

    path: Path
    inputs: tuple[str, ...]
    weights: dict[str, WeightStorage]
    activations: dict[str, SiteStorage]


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


def export_onnx(
    model: LoadedModel,
    packed: PackedArtifact,
    sample: Inputs,
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> OnnxExport:
    """Write `model` (rebuilt from `packed` by `load_packed`) as a QDQ ONNX model at `path`,
    traced on `sample` (one model-ready batch) with a dynamic batch (and sequence) axis.

    `metadata` (the job id, ...) joins the plan and the storage tables in `metadata_props`.
    Raises `ExportRefused` for a plan ONNX cannot express.
    """
    plan = packed.plan
    quantizers = check_exportable(plan.activations)
    path = Path(path)
    module = copy.deepcopy(model.module).eval()
    layers = dict(module.named_modules())
    for name in plan.layers:
        parametrize.register_parametrization(
            layers[name], "weight", _WeightMarker(name, packed.codes[name]), unsafe=True
        )
    names = _input_names(sample)
    tensors = (sample,) if isinstance(sample, Tensor) else tuple(sample[n] for n in names)
    # In eval mode for good: the exporter restores a module's own training flag after tracing,
    # and a new wrapper's is True, which would leave dropout on for the checks that follow.
    wrapper = _Traced(replace_module(model, module), names).eval()
    sites = plan_sites(quantizers, layers)

    def transform(site: str, x: Tensor) -> Tensor:
        return _activation_marker(site, quantizers[site]).apply(x)

    with tempfile.TemporaryDirectory(prefix="bitplan-onnx-") as tmp:
        traced = Path(tmp) / "traced.onnx"
        with instrument(module, sites, transform), _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                wrapper,
                tensors,
                str(traced),
                dynamo=False,
                opset_version=TRACE_OPSET,
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                dynamic_axes=_dynamic_axes(names, tensors),
                custom_opsets={MARKER_DOMAIN: 1},
            )
        proto = onnx.load(str(traced))
    weights = _replace_weights(proto, packed)
    missing = sorted(set(packed.codes) - set(weights))
    unused = _unused_layers(wrapper, tensors, layers, missing)
    if len(unused) < len(missing):
        followed = [name for name in missing if name not in unused][:5]
        raise ExportRefused(
            f"the traced graph does not use the weights of {followed}: the model computes "
            "them in a way the exporter cannot follow"
        )
    activations = {site: _replace_activation(proto, site, quantizers[site]) for site in quantizers}
    _strip_prefix(proto, "module.")
    _drop_unused_initializers(proto)
    others = [o for o in proto.opset_import if o.domain not in ("", MARKER_DOMAIN, "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", OPSET), *others])
    onnx.helper.set_model_props(
        proto,
        {
            "bitplan.format": FORMAT,
            "bitplan.plan": json.dumps(plan.to_dict()),
            "bitplan.weights": json.dumps({k: asdict(v) for k, v in weights.items()}),
            "bitplan.activations": json.dumps({k: asdict(v) for k, v in activations.items()}),
            "bitplan.unused_layers": json.dumps(unused),
            **dict(metadata or {}),
        },
    )
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return OnnxExport(path, names, weights, activations)


def replace_module(model: LoadedModel, module: nn.Module) -> LoadedModel:
    """`model` running `module` instead of its own (same inputs, same output function)."""
    return dataclasses.replace(model, module=module)


def feeds(names: Sequence[str], batch: Inputs) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed for one model-ready batch, by the exported input names."""
    if isinstance(batch, Tensor):
        return {names[0]: batch.detach().cpu().numpy()}
    return {name: batch[name].detach().cpu().numpy() for name in names}


def layer_outputs(proto: onnx.ModelProto) -> dict[str, str]:
    """Each planned layer's output tensor in `proto` (the Conv / Gemm output, or MatMul's
    after its bias Add), by layer name, read off the weights in its metadata: what a parity
    check exposes to find where outputs first diverge."""
    weights = json.loads(_props(proto)["bitplan.weights"])
    producers = {out: node for node in proto.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for layer, storage in weights.items():
        weight_node = next(
            node for node in proto.graph.node if storage["initializer"] in node.input
        )
        users = consumers.get(weight_node.output[0], [])
        if len(users) != 1:
            continue
        op = users[0]
        output = op.output[0]
        after = consumers.get(output, [])
        if op.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "Add":
            other = next(name for name in after[0].input if name != output)
            if other not in producers or producers[other].op_type == "Constant":
                output = after[0].output[0]
        found[layer] = output
    return found


def activation_codes(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """Activation site -> the tensors holding its codes (QuantizeLinear outputs), one per call
    of the site in graph order, as `_replace_activation` names them."""
    codes: dict[str, list[tuple[int, str]]] = {}
    for node in proto.graph.node:
        match = (
            ACTIVATION_CODES.fullmatch(node.output[0]) if node.op_type == "QuantizeLinear" else None
        )
        if match is not None:
            codes.setdefault(match["site"], []).append((int(match["call"] or 0), node.output[0]))
    return {site: [name for _, name in sorted(calls)] for site, calls in codes.items()}


def stamp(path: str | Path, job_id: str) -> None:
    """Name the job in an exported file's metadata (`bitplan.job_id`): a job's id exists only
    once it is recorded, after the pipeline that exported it has run."""
    proto = onnx.load(str(path))
    props = {**_props(proto), "bitplan.job_id": job_id}
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file, without loading its weights."""
    return _props(onnx.load(str(path), load_external_data=False))


# --- tracing -------------------------------------------------------------------------------------


class _Traced(nn.Module):
    """The model as a function of positional tensors, which is what the tracer feeds."""

    def __init__(self, model: LoadedModel, names: tuple[str, ...]) -> None:
        super().__init__()
        self.module = model.module
        self._model = model
        self._names = names

    def forward(self, *tensors: Tensor) -> Tensor:
        if self._names == (IMAGE_INPUT,):
            return self._model(tensors[0])
        return self._model(dict(zip(self._names, tensors, strict=True)))


class _WeightMarker(nn.Module):
    """A parametrization that makes a planned weight `bitplan::Weight(layer)` in the traced
    graph, and its dequantized value (what `apply` computes) in eager mode."""

    def __init__(self, layer: str, quantized: Any) -> None:
        super().__init__()
        self.layer = layer
        self.value = quantized.dequantize()

    def forward(self, original: Tensor) -> Tensor:
        value, layer = self.value, self.layer

        class Weight(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, w: Tensor) -> Tensor:
                return value.to(w.device)

            @staticmethod
            def symbolic(g: Any, w: Any) -> Any:
                out = g.op(f"{MARKER_DOMAIN}::Weight", w, layer_s=layer)
                return out.setType(w.type())

        return Weight.apply(original)


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


def _input_names(sample: Inputs) -> tuple[str, ...]:
    if isinstance(sample, Tensor):
        return (IMAGE_INPUT,)
    return tuple(sorted(sample))


def _dynamic_axes(names: Sequence[str], tensors: Sequence[Tensor]) -> dict[str, dict[int, str]]:
    """Batch (and, for token inputs, sequence) axes left open, so any batch runs."""
    axes = {}
    for name, tensor in zip(names, tensors, strict=True):
        axes[name] = {0: "batch"} if name == IMAGE_INPUT else {0: "batch", 1: "sequence"}
        if tensor.dim() < 2:
            axes[name] = {0: "batch"}
    axes[OUTPUT_NAME] = {0: "batch"}
    return axes


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The TorchScript exporter warns that it is legacy and that custom ops lack shapes; both
    are known here and would only fill a job's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --- rewriting the markers -----------------------------------------------------------------------


def _replace_weights(proto: onnx.ModelProto, packed: PackedArtifact) -> dict[str, WeightStorage]:
    """Each `bitplan::Weight` marker becomes DequantizeLinear of the artifact's codes (or a
    Cast of its float16 weight), a following Transpose folded into a transposed layout."""
    graph = proto.graph
    consumers = _consumers(graph)
    storage = {}
    for node in [n for n in graph.node if n.domain == MARKER_DOMAIN and n.op_type == "Weight"]:
        layer = _attribute(node, "layer")
        quantized = packed.codes[layer]
        users = consumers.get(node.output[0], [])
        output = node.output[0]
        transposed = (
            len(users) == 1
            and users[0].op_type == "Transpose"
            and quantized.codes.dim() == 2
            and list(_ints(users[0], "perm")) == [1, 0]
        )
        if transposed:
            output = users[0].output[0]
            graph.node.remove(users[0])
        new_nodes, inits, storage[layer] = _weight_nodes(layer, quantized, transposed, output)
        _swap(graph, node, new_nodes)
        graph.initializer.extend(inits)
    return storage


def _unused_layers(
    wrapper: nn.Module,
    tensors: tuple[Tensor, ...],
    layers: Mapping[str, nn.Module],
    names: list[str],
) -> list[str]:
    """Those of `names` whose output the model's outputs never depend on (a BERT pooler that a
    sentence embedding runs and drops): shifting their output leaves the outputs bit-equal.
    The tracer prunes such layers, so their weights are legitimately absent from the graph."""
    with torch.no_grad():
        reference = wrapper(*tensors)
        unused = []
        for name in names:
            handle = layers[name].register_forward_hook(lambda _m, _a, out: out + 1.0)
            try:
                shifted = wrapper(*tensors)
            finally:
                handle.remove()
            if torch.equal(shifted, reference):
                unused.append(name)
    return unused


def _weight_nodes(
    layer: str, quantized: Any, transposed: bool, output: str
) -> tuple[list[onnx.NodeProto], list[TensorProto], WeightStorage]:
    codes = quantized.codes.detach().cpu()
    if transposed:
        codes = codes.t().contiguous()
    if quantized.bits == FLOAT_BITS:
        name = f"{layer}.weight_float16"
        init = numpy_helper.from_array(codes.numpy().astype(np.float16), name)
        cast = helper.make_node("Cast", [name], [output], to=TensorProto.FLOAT)
        return [cast], [init], WeightStorage(name, "FLOAT16", FLOAT_BITS, None, transposed)
    axis = 1 if transposed else 0
    channels = codes.shape[axis]
    kind = TensorProto.INT4 if quantized.bits <= INT4_MAX_BITS else TensorProto.INT8
    type_name = "INT4" if kind == TensorProto.INT4 else "INT8"
    names = [f"{layer}.weight_codes", f"{layer}.weight_scale", f"{layer}.weight_zero_point"]
    inits = [
        _integer_tensor(names[0], kind, codes.numpy()),
        numpy_helper.from_array(quantized.scale.float().cpu().numpy(), names[1]),
        _integer_tensor(names[2], kind, np.zeros(channels, dtype=np.int8)),
    ]
    node = helper.make_node("DequantizeLinear", names, [output], axis=axis)
    return [node], inits, WeightStorage(names[0], type_name, quantized.bits, axis, transposed)


def _replace_activation(proto: onnx.ModelProto, site: str, quantizer: ActQuantizer) -> SiteStorage:
    """The `bitplan::Activation` markers of `site` (one per call of its layer) become
    [Clip ->] QuantizeLinear -> DequantizeLinear with the quantizer's own scale and zero point."""
    graph = proto.graph
    markers = [
        n
        for n in graph.node
        if n.domain == MARKER_DOMAIN and n.op_type == "Activation" and _attribute(n, "site") == site
    ]
    if not markers:
        raise ExportRefused(f"activation site {site} does not appear in the traced graph")
    qdq = qdq_params(quantizer)
    for index, node in enumerate(markers):
        prefix = f"{site}.act{'' if index == 0 else f'_{index}'}"
        nodes, inits = _qdq_nodes(prefix, node.input[0], node.output[0], qdq)
        _swap(graph, node, nodes)
        graph.initializer.extend(inits)
    return SiteStorage(quantizer.kind, quantizer.bits, "UINT8", qdq.low is not None)


@dataclass(frozen=True)
class _QDQ:
    scale: np.ndarray
    zero_point: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None


def qdq_params(quantizer: ActQuantizer) -> _QDQ:
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
    return _QDQ(scale.numpy().astype(np.float32), zero.numpy().astype(np.uint8), low, high)


def _qdq_nodes(
    prefix: str, source: str, output: str, qdq: _QDQ
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
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


def _integer_tensor(name: str, kind: int, values: np.ndarray) -> TensorProto:
    """An INT4 or INT8 initializer holding `values` exactly (INT4 packed two to a byte)."""
    if kind == TensorProto.INT4:
        return helper.make_tensor(name, kind, values.shape, values.astype(np.int64).ravel())
    return numpy_helper.from_array(values.astype(np.int8), name)


def _swap(graph: onnx.GraphProto, node: onnx.NodeProto, replacement: list[onnx.NodeProto]) -> None:
    """Replace `node` by `replacement` at its place, so the graph stays topologically sorted."""
    index = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(replacement):
        graph.node.insert(index + offset, new)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
    """Initializers named as the model's state_dict (the tracer saw it under `module.`)."""
    renamed = {
        init.name: init.name.removeprefix(prefix)
        for init in proto.graph.initializer
        if init.name.startswith(prefix)
    }
    taken = {init.name for init in proto.graph.initializer} - set(renamed)
    renamed = {old: new for old, new in renamed.items() if new not in taken}
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    """The float weights the markers replaced are no longer read."""
    used = {name for node in proto.graph.node for name in node.input}
    used |= {output.name for output in proto.graph.output}
    keep = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _attribute(node: onnx.NodeProto, name: str) -> str:
    value = helper.get_attribute_value(next(a for a in node.attribute if a.name == name))
    return value.decode() if isinstance(value, bytes) else str(value)


def _ints(node: onnx.NodeProto, name: str) -> list[int]:
    found = [a for a in node.attribute if a.name == name]
    return list(helper.get_attribute_value(found[0])) if found else []


def _props(proto: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in proto.metadata_props}
