"""The cost table: cost[l, b] = what quantizing layer l to b bits is predicted to lose.

The integer program adds costs across layers, so each method's cost must be an additive estimate
of the same thing (loss of quality) on a common scale within a method:

- `fisher`:  0.5 * sum_o G_o * E[(dW x)_o^2]. Second-order Taylor expansion of the loss in the
  layer's *output*, with the per-sample empirical Fisher of the outputs (G_o = sum over samples
  and positions of the squared per-sample gradient at output channel o) standing in for the
  Hessian: the expected loss increase per sample. Measured in the output rather than on the
  weight diagonal because GPTQ rounding moves weights further from FP32 precisely where the
  next columns compensate: a weight-space diagonal sees the move, not the compensation (on
  CIFAR ResNet20 the weight-diagonal Fisher lost to uniform once GPTQ was in).
- `hessian`: 0.5 * (Tr(H_l) / n_l) * ||dW_l||^2, the HAWQ-V2 objective (Hutchinson trace).
- `lrp`:     c_l * e_l(b), where c_l is layer l's share of relevance (LRP-QViT's contribution
  score, summing to 1 over layers) and e_l(b) = ||dW X||^2 / ||W X||^2 the relative error the
  quantized weights cause at the layer's output on calibration inputs. A layer that carries
  a tenth of the explanation and has its output perturbed by 1% costs 0.001.
- `measured`: the divergence of the model's outputs from FP32 with only layer l quantized
  (CalibTIP's per-layer measurement, made smooth by using KL instead of accuracy).
- `lrp+fisher`: each table divided by its own total at the reference width (the sum over layers
  at 4 bits), then averaged: both votes count equally whatever their units.

The output error e_l(b) comes from the second moment of each layer's input, C = E[x x^T], and
its mean m, gathered in one forward: ||dW X||^2 = sum((dW C) * dW) with no further model pass.
A grouped convolution has one (C_g, m_g) per group over the rows that group reads
(`allocator.unfold`), and each output channel's error uses its own group's: a depthwise layer's
channels are judged each on its own 3x3 neighbourhood statistics, so a channel whose few weights
round badly shows in the layer's error instead of being averaged with the others.
The same statistics pick the clipping rule per (layer, bits) by output error (not weight error:
MSE-optimal weight clipping lost accuracy on CIFAR ResNet20 at 3-4 bits) and give the bias
correction -dW m that cancels the mean shift quantization adds to each output channel.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from allocator import unfold
from allocator.device import CPU, to_cpu, to_device
from allocator.layers import LayerTable
from allocator.quant.gptq import HessianFactor, Rounded, gptq_quantize, hessian_factor
from allocator.quant.weight import CLIP_RULES, QuantizedWeight, quantize_weight
from allocator.zoo.base import Inputs, LoadedModel

REFERENCE_BITS = 4
ROWS_PER_BATCH = 2048
"""Input rows (tokens or conv positions) sampled per layer and batch for the input statistics."""


@dataclass
class InputStats:
    """Per layer and weight group g: second moment C_g = E[x_g x_g^T] and mean m_g of the rows
    the group's weights multiply, stacked as (groups, width, width) and (groups, width)."""

    second_moment: dict[str, torch.Tensor] = field(default_factory=dict)
    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def input_stats(
    model: LoadedModel,
    batches: Sequence[Inputs],
    table: LayerTable,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    only: Collection[str] | None = None,
) -> InputStats:
    """Gather every layer's input statistics in one pass over `batches`, at most
    `ROWS_PER_BATCH` sampled positions per layer and batch.

    With `only`, just those layers' statistics are kept (a part of the statistics split over
    workers, `allocator.split`), yet every layer of `table` still draws its rows: the draws
    share one generator, so the kept layers get the rows a whole pass gives them."""
    started = time.perf_counter()
    stats = InputStats()
    modules = dict(model.module.named_modules())
    generator = torch.Generator().manual_seed(seed)

    def hook_for(name: str, padding: str):
        def hook(layer: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x = args[0].detach()
            total = unfold.positions(layer, x, padding)
            pick = None
            if total > ROWS_PER_BATCH:
                # Drawn on the CPU, whatever the device: the same rows on every machine.
                pick = torch.randperm(total, generator=generator, device=CPU)[:ROWS_PER_BATCH]
            if only is not None and name not in only:
                return
            by_group = unfold.rows(layer, x, padding, pick).transpose(0, 1)  # (groups, rows, width)
            gram = by_group.transpose(1, 2) @ by_group
            if name in stats.second_moment:
                stats.second_moment[name] += gram
                stats.mean[name] += by_group.sum(1)
                stats.rows[name] += by_group.shape[1]
            else:
                stats.second_moment[name] = gram
                stats.mean[name] = by_group.sum(1)
                stats.rows[name] = by_group.shape[1]

        return hook

    handles = [
        modules[layer.name].register_forward_hook(hook_for(layer.name, layer.padding))
        for layer in table
    ]
    try:
        with torch.no_grad():
            for index, inputs in enumerate(batches):
                model(inputs)
                if on_batch is not None:
                    on_batch(index)
    finally:
        for handle in handles:
            handle.remove()
    for name, rows in stats.rows.items():
        stats.second_moment[name] /= rows
        stats.mean[name] /= rows
    stats.seconds = time.perf_counter() - started
    return stats


@dataclass(frozen=True)
class QuantChoice:
    """The best clipping and rounding rule for one (layer, bits), and what it does at the
    layer's output."""

    clip: str
    rounding: str
    quantized: QuantizedWeight
    output_error: float
    """||dW X||^2 / ||W X||^2 after bias correction (0 for float16)."""
    channel_error: torch.Tensor
    """E[(dW x)_o^2] per output channel o, per input row (absolute, after bias correction)."""
    weight_error: torch.Tensor
    """dW, the weight error of the chosen rule."""
    bias_correction: torch.Tensor | None


Choices = Mapping[tuple[str, int], QuantChoice]


def choices_state(choices: Choices) -> list[dict[str, Any]]:
    """`choices` as plain containers of CPU tensors (`allocator.cache` stores them, and a
    machine without the job's device must be able to read them); the weight errors are left
    out, `choices_from_state` recomputes them from the model."""
    state = [
        {
            "layer": name,
            "bits": b,
            "clip": c.clip,
            "rounding": c.rounding,
            "codes": c.quantized.codes,
            "scale": c.quantized.scale,
            "quantized_bits": c.quantized.bits,
            "quantized_clip": c.quantized.clip,
            "output_error": c.output_error,
            "channel_error": c.channel_error,
            "bias_correction": c.bias_correction,
        }
        for (name, b), c in choices.items()
    ]
    return to_cpu(state)


def choices_from_state(state: Sequence[Mapping[str, Any]], module: nn.Module) -> Choices:
    """The choices `choices_state` wrote, for the layers of `module`, on its device."""
    modules = dict(module.named_modules())
    choices = {}
    for stored in state:
        weight = modules[stored["layer"]].weight.detach()
        entry = to_device(dict(stored), weight.device)
        quantized = QuantizedWeight(
            codes=entry["codes"],
            scale=entry["scale"],
            bits=entry["quantized_bits"],
            clip=entry["quantized_clip"],
        )
        choices[(entry["layer"], entry["bits"])] = QuantChoice(
            clip=entry["clip"],
            rounding=entry["rounding"],
            quantized=quantized,
            output_error=entry["output_error"],
            channel_error=entry["channel_error"],
            weight_error=quantized.dequantize() - weight,
            bias_correction=entry["bias_correction"],
        )
    return choices


def _channel_error(delta: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """E[(delta x)_o^2] per output channel o, each from its own group's second moment."""
    grouped = unfold.grouped_weight(delta, moment.shape[0])
    return ((grouped @ moment) * grouped).sum(-1).reshape(-1)


def _output_error(delta: torch.Tensor, moment: torch.Tensor) -> float:
    return float(_channel_error(delta, moment).sum())


ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class _LayerInputs:
    """One layer's statistics as the choices read them (per weight group)."""

    covariance: torch.Tensor
    """The second moment, centred when bias correction removes the mean shift."""
    mean: torch.Tensor
    signal: float
    """||W X||^2, what the relative output error divides by."""
    factor: HessianFactor | None
    """GPTQ's factor of the inverse covariance, when a rule set rounds with GPTQ."""
    bias_correction: bool


def _layer_inputs(
    weight: torch.Tensor, stats: InputStats, name: str, bias_correction: bool, gptq: bool
) -> _LayerInputs:
    moment = stats.second_moment[name]
    mean = stats.mean[name]
    covariance = moment - mean[:, :, None] * mean[:, None, :] if bias_correction else moment
    return _LayerInputs(
        covariance,
        mean,
        max(_output_error(weight, moment), 1e-30),
        hessian_factor(covariance) if gptq else None,
        bias_correction,
    )


def quant_choices(
    model: LoadedModel,
    table: LayerTable,
    stats: InputStats,
    bits: Sequence[int],
    clips: Sequence[str] = tuple(CLIP_RULES),
    roundings: Sequence[str] = ROUNDINGS,
    bias_correction: bool = True,
    on_layer: Callable[[int], None] | None = None,
) -> dict[tuple[str, int], QuantChoice]:
    """For every layer and width, the (clip, rounding) pair with the least output error."""
    rules = {"": (tuple(clips), tuple(roundings))}
    return rule_set_choices(model, table, stats, bits, rules, bias_correction, on_layer)[""]


RuleSet = tuple[tuple[str, ...], tuple[str, ...]]
"""Clipping rules x rounding rules a choice may pick from."""


def rule_set_choices(
    model: LoadedModel,
    table: LayerTable,
    stats: InputStats,
    bits: Sequence[int],
    rule_sets: Mapping[str, RuleSet],
    bias_correction: bool = True,
    on_layer: Callable[[int], None] | None = None,
) -> dict[str, dict[tuple[str, int], QuantChoice]]:
    """For each rule set, every layer and width's least-output-error choice within the set.

    Each (clip, rounding) pair is quantized once however many sets hold it. With bias
    correction the error that counts is the centred one (the mean shift is removed by the
    correction), so GPTQ is given the input covariance rather than the second moment.
    """
    modules = dict(model.module.named_modules())
    pairs = sorted(
        {(c, r) for clips, roundings in rule_sets.values() for c in clips for r in roundings}
    )
    chosen: dict[str, dict[tuple[str, int], QuantChoice]] = {name: {} for name in rule_sets}
    gptq = any(rounding == "gptq" for _, rounding in pairs)
    for index, layer in enumerate(table):
        weight = modules[layer.name].weight.detach()
        inputs = _layer_inputs(weight, stats, layer.name, bias_correction, gptq)
        widths = sorted(set(bits) | ({layer.pinned_bits} if layer.pinned_bits else set()))
        quantized = _quantize(weight, widths, pairs, inputs.factor)
        for b in widths:
            candidates = {
                pair: _choice(weight, b, *pair, quantized[(*pair, b)], inputs)
                for pair in _pairs_at(b, pairs)
            }
            for name, (clips, roundings) in rule_sets.items():
                allowed = [
                    c
                    for pair, c in candidates.items()
                    if b >= 16 or (pair[0] in clips and pair[1] in roundings)
                ]
                chosen[name][(layer.name, b)] = min(allowed, key=lambda c: c.output_error)
        if on_layer is not None:
            on_layer(index)
    return chosen


def _pairs_at(b: int, pairs: Sequence[tuple[str, str]]) -> Sequence[tuple[str, str]]:
    """The (clip, rounding) pairs tried at width `b`: float16 has one way to store a weight."""
    return pairs if b < 16 else [(pairs[0][0], "nearest")]


def _quantize(
    weight: torch.Tensor,
    widths: Sequence[int],
    pairs: Sequence[tuple[str, str]],
    factor: HessianFactor | None,
) -> dict[tuple[str, str, int], Rounded]:
    """Every (clip, rounding, width) of one layer; the GPTQ ones in one batch on the grids of
    the round-to-nearest ones, with the output errors the batch measures on the way."""
    grids = {
        (clip, b): quantize_weight(weight, b, clip)
        for b in widths
        for clip in dict.fromkeys(clip for clip, _ in _pairs_at(b, pairs))
    }
    refine = [
        (clip, b) for b in widths for clip, rounding in _pairs_at(b, pairs) if rounding == "gptq"
    ]
    refined = (
        gptq_quantize(weight, factor, [grids[key] for key in refine]) if factor is not None else []
    )
    quantized = {(clip, "nearest", b): Rounded(grid, None) for (clip, b), grid in grids.items()}
    quantized.update({(clip, "gptq", b): q for (clip, b), q in zip(refine, refined, strict=True)})
    return quantized


def _choice(
    weight: torch.Tensor,
    b: int,
    clip: str,
    rounding: str,
    rounded: Rounded,
    inputs: _LayerInputs,
) -> QuantChoice:
    quantized = rounded.quantized
    delta = quantized.dequantize() - weight
    per_channel = (
        _channel_error(delta, inputs.covariance)
        if rounded.channel_error is None
        else rounded.channel_error.float()
    )
    correction = None
    if inputs.bias_correction and b < 16:
        grouped = unfold.grouped_weight(delta, inputs.mean.shape[0])
        correction = -(grouped @ inputs.mean[:, :, None]).reshape(-1)
    error = float(per_channel.sum()) / inputs.signal
    return QuantChoice(clip, rounding, quantized, error, per_channel, delta, correction)


def _table(
    table: LayerTable, bits: Sequence[int], value: Callable[[str, int], float]
) -> np.ndarray:
    return np.array([[value(layer.name, b) for b in bits] for layer in table], dtype=np.float64)


def fisher_costs(table, bits, choices, fisher_out: Mapping[str, torch.Tensor]) -> np.ndarray:
    return _table(
        table,
        bits,
        lambda n, b: 0.5 * float((fisher_out[n] * choices[(n, b)].channel_error).sum()),
    )


def hessian_costs(table, bits, choices, trace: Mapping[str, float]) -> np.ndarray:
    return _table(
        table,
        bits,
        lambda n, b: 0.5 * trace[n] * float((choices[(n, b)].weight_error ** 2).sum()),
    )


def lrp_costs(table, bits, choices, relevance: Mapping[str, float]) -> np.ndarray:
    total = sum(relevance.values()) or 1.0
    return _table(table, bits, lambda n, b: relevance[n] / total * choices[(n, b)].output_error)


def normalise(cost: np.ndarray, bits: Sequence[int]) -> np.ndarray:
    """Divide by the summed cost at the reference width, so methods can be averaged."""
    column = list(bits).index(REFERENCE_BITS) if REFERENCE_BITS in bits else len(bits) // 2
    return cost / max(float(cost[:, column].sum()), 1e-30)


def combine(tables: Sequence[np.ndarray], bits: Sequence[int]) -> np.ndarray:
    return sum(normalise(t, bits) for t in tables) / len(tables)
