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
one step travels through every later layer, and many samples end beyond `TOLERANCE` although
the model is the same (docs/design.md has the figures). So such a
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
recorded beside (`Parity.defaults`), so the cost of running it without them is known
(`allocator.export.runtime` opens every session). The code-by-code check is
`allocator.export.codes`.

Imports torch, onnx and onnxruntime; never anything from the service, database or worker layers.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor

from allocator.activations import quantized_activations
from allocator.data import EvalSet, evaluate_outputs
from allocator.errors import ParityFailed
from allocator.export.codes import SiteCodes, site_codes
from allocator.export.onnx_qdq import feeds, layer_outputs, plan_sites
from allocator.export.runtime import runtime_forward, session
from allocator.quant.activation import ActQuantizer
from allocator.zoo.base import Inputs, LoadedModel

TOLERANCE = 1e-3
"""Largest absolute output difference allowed, as a fraction of the reference output range."""
METRIC_TOLERANCE = 0.1
"""Largest difference of the primary metric allowed (points for top-1 and Spearman)."""
COUNTED_METRICS = ("top1",)
"""Metrics that count samples: with quantized activations a sample at a code boundary may
change its answer, so their tolerance is a share of the samples (`metric_tolerance`)."""
FLIPPED_SAMPLES = 0.01
"""With quantized activations, the share of samples (at least one) whose answer may differ in a
counted metric: codes one step off at boundaries (judged site by site, `codes`) move a few
answers. EfficientNet-Lite1 W/A8 on 244 images: 5,783 of 2.5 G codes one step off, none
further, outputs from the runtime's codes 4e-06 off, and two images answered differently."""


def metric_tolerance(metric: str, samples: int, activations: bool) -> float:
    """`METRIC_TOLERANCE`, or with quantized activations and a counted metric,
    `FLIPPED_SAMPLES` of the samples (at least one sample's share): images whose logits sit at
    a boundary may flip with the runtime's rounding, and 0.1 points is less than one of 244
    images."""
    if activations and metric in COUNTED_METRICS and samples:
        flips = max(1, math.ceil(FLIPPED_SAMPLES * samples))
        return max(METRIC_TOLERANCE, 100.0 * flips / samples)
    return METRIC_TOLERANCE


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
        # Relative slack: a gap of exactly one sample's share must not fail on float rounding.
        metric_ok = metric_gap <= self.metric_tolerance * (1 + 1e-9) or (
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
            f"{self.metric} {self.runtime_metric:.2f} against {self.bitplan_metric:.2f} "
            f"(tolerance {self.metric_tolerance:.2g})"
        )


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
        metric_tolerance=metric_tolerance(metric, len(evalset), bool(quantizers)),
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
