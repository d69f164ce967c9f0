"""Run an exported ONNX model in ONNX Runtime and compare it with bitplan's quantized model.

An export is only handed out when ONNX Runtime (CPUExecutionProvider) reproduces bitplan's own
quantized model on the job's evaluation samples: the largest absolute output difference must
stay within `TOLERANCE` of the range of bitplan's outputs and the primary metric within
`METRIC_TOLERANCE`. When it does not, the graph is run again on the batch with the largest
difference with every planned layer's output exposed as an extra graph output, and the first
layer (in the order the torch model runs them) whose output differs beyond the same relative
tolerance is named.

With quantized activations the outputs alone cannot judge: the runtime sums in another order,
so an activation within float rounding of a code boundary takes the neighbouring code, and that
one step travels through every later layer (on CIFAR ResNet20 at W/A8, 0.003 % of the codes at
the second site, 10 % at the last, and a third of the samples beyond `TOLERANCE`). So such a
plan is checked code by code (`site_codes`): every site's codes are exposed as graph outputs,
and bitplan's model runs with each site fed the runtime's own codes, computing from them the
codes of the sites after it. A site's differences are then its own, not inherited: the export
passes when no code is more than one step off, at most `CODE_FLIP_SHARE` of any site's codes
are one step off, and the final outputs, computed from the runtime's last codes, are within
`TOLERANCE`. A wrong scale, zero point, rewritten bias or a kernel that quantizes differently
moves codes by more than a step or at far more than a boundary's share.

Two of ONNX Runtime's default graph rewrites compute a different model from the one bitplan
evaluated: `DequantizeLinear -> MatMul` becomes MatMulNBits, which by default
(`session.qdq_matmulnbits_accuracy_level` 4) quantizes the activations to int8 on the fly (on
the tiny ViT of the tests, 1 % of the output range off), and WeightBiasQuantization rounds a
float bias after quantized inputs to int32 on the grid input scale x weight scale (on a 4-bit
activation, 1.6 % of the output range on the tests' CNN). `SESSION_CONFIG` and
`DISABLED_OPTIMIZERS` switch both off, parity is measured with them, and the exported model's
metadata names them for whoever runs it; the figures under ONNX Runtime's defaults are
recorded beside (`Parity.defaults`), so the cost of running it without them is known.

Imports torch, onnx and onnxruntime; never anything from the service, database or worker layers.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor

from allocator.activations import instrument, quantized_activations
from allocator.data import EvalSet, evaluate_outputs
from allocator.errors import ParityFailed
from allocator.export.onnx_qdq import (
    OUTPUT_NAME,
    activation_codes,
    feeds,
    layer_outputs,
    plan_sites,
    qdq_params,
)
from allocator.quant.activation import ActQuantizer
from allocator.zoo.base import Inputs, LoadedModel

TOLERANCE = 1e-3
"""Largest absolute output difference allowed, as a fraction of the reference output range."""
CODE_FLIP_SHARE = 1e-3
"""The largest share of one site's activation codes allowed one step off the runtime's, given
the same codes at the sites before it (none may be further off)."""
METRIC_TOLERANCE = 0.1
"""Largest difference of the primary metric allowed (points for top-1 and Spearman)."""
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "1"}
"""Session config entries the parity is measured with (float accumulation in MatMulNBits)."""
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)
"""Graph rewrites switched off for parity (float biases stay float)."""
PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Parity:
    """The runtime's outputs against bitplan's on the evaluation samples."""

    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    output_range: float
    metric: str
    runtime_metric: float
    bitplan_metric: float
    rows: int
    """Output rows compared (samples; sentences for sentence pairs)."""
    over_tolerance: int
    """Rows whose largest difference is above `tolerance` of the output range."""
    activations: bool
    """Whether the plan quantizes activations (rounding flips are then expected)."""
    tolerance: float = TOLERANCE
    metric_tolerance: float = METRIC_TOLERANCE
    codes: SiteCodes | None = None
    """With quantized activations whose outputs differ beyond `tolerance`: the check code by
    code that then decides."""
    defaults: dict[str, float] | None = None
    """The max abs diff and metric of the same model in a session with ONNX Runtime's
    defaults (informative: parity is judged with `SESSION_CONFIG`)."""

    @property
    def passed(self) -> bool:
        metric_gap = abs(self.runtime_metric - self.bitplan_metric)
        metric_ok = metric_gap <= self.metric_tolerance or (
            math.isnan(self.runtime_metric) and math.isnan(self.bitplan_metric)
        )
        outputs_ok = self.max_abs_diff <= self.tolerance * self.output_range or (
            self.codes is not None
            and self.codes.passed
            and self.codes.output_max_abs_diff <= self.tolerance * self.output_range
        )
        return metric_ok and outputs_ok

    def text(self) -> str:
        codes = "" if self.codes is None else f"; {self.codes.text()}"
        return (
            f"max abs diff {self.max_abs_diff:.3g} ({self.max_abs_diff / self.output_range:.3g} "
            f"of the output range {self.output_range:.3g}, tolerance {self.tolerance:g}; "
            f"{self.over_tolerance} of {self.rows} samples beyond it){codes}; "
            f"{self.metric} {self.runtime_metric:.2f} against {self.bitplan_metric:.2f}"
        )


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
    flip_share: float = CODE_FLIP_SHARE

    @property
    def passed(self) -> bool:
        return self.beyond == 0 and self.worst_share <= self.flip_share

    def text(self) -> str:
        where = (
            ""
            if self.worst_site is None
            else f", at most {self.worst_share:.2e} at {self.worst_site}"
        )
        return (
            f"site by site {self.one_step} of {self.codes} activation codes one step off and "
            f"{self.beyond} further{where} (allowed {self.flip_share:g} a site, none further), "
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
            "passed": self.passed,
        }


def runtime_name() -> str:
    return f"onnxruntime {ort.__version__} {PROVIDER}"


def session(
    path: str | Path, defaults: bool = False, threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with `SESSION_CONFIG` and `DISABLED_OPTIMIZERS` (or, with
    `defaults`, as ONNX Runtime comes) and as many intra-op threads as torch uses, so both
    sides of a comparison or a timing get the same."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    if defaults:
        return ort.InferenceSession(str(path), options, providers=[PROVIDER])
    for key, value in SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(
        str(path), options, providers=[PROVIDER], disabled_optimizers=list(DISABLED_OPTIMIZERS)
    )


def session_metadata() -> dict[str, str]:
    """How to open the exported model so that it computes what parity measured."""
    settings = {"config": SESSION_CONFIG, "disabled_optimizers": list(DISABLED_OPTIMIZERS)}
    return {"bitplan.onnxruntime_session": json.dumps(settings)}


def runtime_forward(
    runtime: ort.InferenceSession, names: Sequence[str]
) -> Callable[[Inputs], Tensor]:
    """The exported model as a function of a model-ready batch, like `LoadedModel.__call__`."""

    def forward(batch: Inputs) -> Tensor:
        return torch.from_numpy(runtime.run([OUTPUT_NAME], feeds(names, batch))[0])

    return forward


@contextmanager
def bitplan_forward(
    model: LoadedModel, quantizers: Mapping[str, ActQuantizer]
) -> Iterator[Callable[[Inputs], Tensor]]:
    """bitplan's quantized model (weights from `load_packed`) with the plan's activation
    quantizers, as the job evaluated it."""
    sites = plan_sites(quantizers, dict(model.module.named_modules()))
    with quantized_activations(model.module, sites, quantizers):
        yield model


def check_parity(
    path: str | Path,
    names: Sequence[str],
    model: LoadedModel,
    quantizers: Mapping[str, ActQuantizer],
    evalset: EvalSet,
    fp32_reference: Tensor | None = None,
    tolerance: float = TOLERANCE,
) -> Parity:
    """Compare the ONNX model at `path` with bitplan's on every batch of `evalset`; raises
    `ParityFailed`, naming the first diverging layer, above tolerance. `fp32_reference` (FP32
    outputs on `evalset`) is needed only when the primary metric compares with FP32."""
    runtime = runtime_forward(session(path), names)
    expected: list[Tensor] = []
    worst: list[float] = []

    def reference(batch: Inputs) -> Tensor:
        expected.append(ours(batch).float())
        return expected[-1]

    def onnx_forward(batch: Inputs) -> Tensor:
        out = runtime(batch).float()
        worst.append(float((out - expected[len(worst)]).abs().max()))
        return out

    with bitplan_forward(model, quantizers) as ours:
        bitplan_out = evalset.outputs(reference)
    runtime_out = evalset.outputs(onnx_forward)
    difference = (runtime_out - bitplan_out).abs()
    metric = evalset.primary_metric
    default_out = evalset.outputs(runtime_forward(session(path, defaults=True), names))
    defaults = {
        "max_abs_diff": float((default_out - bitplan_out).abs().max()),
        "runtime_metric": evaluate_outputs(default_out, evalset, fp32_reference)[metric],
    }
    output_range = float(bitplan_out.max() - bitplan_out.min()) or 1.0
    per_row = difference.reshape(len(difference), -1).amax(dim=1)
    codes = None
    if quantizers and float(difference.max()) > tolerance * output_range:
        codes = site_codes(path, names, model, quantizers, evalset)
    parity = Parity(
        samples=len(evalset),
        rows=len(per_row),
        over_tolerance=int((per_row > tolerance * output_range).sum()),
        activations=bool(quantizers),
        max_abs_diff=float(difference.max()),
        mean_abs_diff=float(difference.mean()),
        output_range=output_range,
        metric=metric,
        runtime_metric=evaluate_outputs(runtime_out, evalset, fp32_reference)[metric],
        bitplan_metric=evaluate_outputs(bitplan_out, evalset, fp32_reference)[metric],
        tolerance=tolerance,
        codes=codes,
        defaults=defaults,
    )
    if not parity.passed:
        batch = evalset.batches[int(np.argmax(worst))]
        where = first_divergence(path, names, model, quantizers, batch, tolerance)
        failure = ParityFailed(
            f"ONNX Runtime does not reproduce bitplan's model: {parity.text()}; {where}"
        )
        failure.parity = parity  # type: ignore[attr-defined]  # the figures, for the record
        raise failure
    return parity


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
    worst = max(shares, key=shares.__getitem__) if any(shares.values()) else None
    return SiteCodes(
        sites=len(by_site),
        codes=sum(c[0] for c in counts.values()),
        one_step=sum(c[1] for c in counts.values()),
        beyond=sum(c[2] for c in counts.values()),
        worst_site=worst,
        worst_share=0.0 if worst is None else shares[worst],
        output_max_abs_diff=worst_output,
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


def first_divergence(
    path: str | Path,
    names: Sequence[str],
    model: LoadedModel,
    quantizers: Mapping[str, ActQuantizer],
    batch: Inputs,
    tolerance: float = TOLERANCE,
) -> str:
    """Where outputs first part: every planned layer's output exposed as a graph output, run on
    `batch` in ONNX Runtime and in torch (forward hooks, in the order torch runs the layers);
    the first layer off by more than `tolerance` of its own output range."""
    proto = onnx.load(str(path))
    outputs = layer_outputs(proto)
    present = {out.name for out in proto.graph.output}
    for tensor in outputs.values():
        if tensor not in present:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
            present.add(tensor)
    modules = dict(model.module.named_modules())
    seen: dict[str, Tensor] = {}
    handles = [
        modules[layer].register_forward_hook(_keep(layer, seen))
        for layer in outputs
        if layer in modules
    ]
    try:
        with torch.no_grad(), bitplan_forward(model, quantizers) as ours:
            ours(batch)
    finally:
        for handle in handles:
            handle.remove()
    with tempfile.TemporaryDirectory(prefix="bitplan-parity-") as tmp:
        debug = Path(tmp) / "layers.onnx"
        onnx.save(proto, str(debug))
        runtime = session(debug)
        tensors = list(outputs.values())
        values = dict(zip(tensors, runtime.run(tensors, feeds(names, batch)), strict=True))
    for layer, expected in seen.items():
        got = torch.from_numpy(values[outputs[layer]]).float()
        if got.shape != expected.shape:
            return f"first diverging layer: {layer} (output shape {tuple(got.shape)} in ONNX, {tuple(expected.shape)} in bitplan)"
        gap = float((got - expected).abs().max())
        scale = float(expected.max() - expected.min()) or 1.0
        if gap > tolerance * scale:
            return f"first diverging layer: {layer} (max abs diff {gap:.3g} of an output range {scale:.3g})"
    return "no planned layer's output diverges; the difference arises after the last one"


def _keep(layer: str, seen: dict[str, Tensor]) -> Callable[..., None]:
    def hook(_module: torch.nn.Module, _args: tuple, out: Tensor) -> None:
        seen.setdefault(layer, out.detach().float().clone())

    return hook
