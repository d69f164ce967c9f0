"""Activation sites: every activation that feeds a quantized matmul, found by running the model.

A site is the input of a layer of the layer table (its role says what produced it: a LayerNorm,
a GELU, the network input, anything else) or the attention probabilities of an attention module
(post-Softmax, feeding `probs @ v`). Roles come from tensor identity during one forward pass,
not from module names, so timm ViT/DeiT/Swin, Hugging Face BERT and CNNs need no per-family list.
Where identity breaks because the producer's output was only rearranged on its way (Swin's
window partition and shift: reshape, permute, roll), the layer takes the role of the last
module that ran before it, provided that module's output had as many values as the layer's
input and no module but a pass-through (Identity, Dropout) ran in between.

Which dimension holds the channels comes from the consuming layer, not from the tensor's rank:
a convolution reads NCHW (dimension 1), a linear layer its last dimension, whatever the rank. A
4D input is not always NCHW: ConvNeXt permutes to NHWC before its LayerNorm and MLP, Swin's
patch merging normalises and reduces NHWC. Calibration rows and per-channel quantizers both
follow the site's axis, so the ranges a quantizer learned are applied to the channels they
were measured on.

`instrument` is the one mechanism that both collects calibration samples and applies quantizers:
pre-hooks on layer inputs, and a replacement of scaled dot-product attention (see
allocator/attention.py) for the probabilities of the attention module being run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from allocator.attention import Combine, sdpa_replacement
from allocator.layers import LayerTable
from allocator.quant.activation import ActQuantizer
from allocator.zoo.base import Inputs, LoadedModel, run_hooked

ROLES = ("post-ln", "post-gelu", "post-softmax", "input", "other")
PASS_THROUGH = (nn.Identity, nn.Dropout)
"""Leaf modules that leave a tensor's values as they were (in eval mode)."""
CHANNELS_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose input holds its channels in dimension 1; every other layer reads the last."""
ROWS_PER_SITE = 4096
"""Calibration rows (or probabilities / 64) kept per site."""

Transform = Callable[[str, torch.Tensor], torch.Tensor]
"""(site name, activation) -> the activation to use instead."""


@dataclass(frozen=True)
class Site:
    name: str
    """The layer's name for an input site; `<attention module>.probs` for probabilities."""
    role: str
    layer: str | None
    """The layer whose input this is (None for attention probabilities)."""
    macs: int
    """Multiply-accumulates per sample of the matmul this activation feeds."""
    channel_axis: int = -1
    """The dimension of the activation that holds the consuming layer's input channels."""


_local = threading.local()
"""The transform `instrument` routes attention probabilities through, and the attention module
running now, per thread: requests served side by side each see their own."""


def current_transform() -> Transform | None:
    """The transform this thread's `instrument` set (None outside one)."""
    return getattr(_local, "transform", None)


@contextmanager
def transform_in_thread(transform: Transform | None) -> Iterator[None]:
    """Run this thread's passes under `transform`, as the thread that entered `instrument`
    runs them (for worker threads that run the instrumented model on its behalf)."""
    previous = current_transform()
    _local.transform = transform
    try:
        yield
    finally:
        _local.transform = previous


def find_sites(model: LoadedModel, sample: Inputs, table: LayerTable) -> list[Site]:
    """The sites of `model`, input sites in layer-table order, then attention probabilities."""
    modules = dict(model.module.named_modules())
    producers: dict[int, str] = {}
    keep: list[torch.Tensor] = []
    inputs: dict[str, int] = {}
    handles = []

    def remember(role: str):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor):
                keep.append(out)
                producers[id(out)] = role

        return hook

    last: list[tuple[str | None, int]] = [(None, -1)]
    reshaped: dict[str, str | None] = {}

    def note(role: str | None):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor):
                last[0] = (role, out.numel())

        return hook

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            keep.append(args[0])
            inputs.setdefault(name, id(args[0]))
            last_role, values = last[0]
            reshaped.setdefault(name, last_role if values == args[0].numel() else None)

        return hook

    for child in model.module.modules():
        role = _producer_role(child)
        if role is not None:
            handles.append(child.register_forward_hook(remember(role)))
        if not any(child.children()) and not isinstance(child, PASS_THROUGH):
            handles.append(child.register_forward_hook(note(role)))
    for name in table.names:
        handles.append(modules[name].register_forward_pre_hook(record(name)))
    run_hooked(model, sample, handles)
    first = table.layers[0].name

    def role(name: str) -> str:
        if name == first:
            return "input"
        produced = producers.get(inputs.get(name, -1))
        return produced or reshaped.get(name) or "other"

    sites = [
        Site(
            layer.name, role(layer.name), layer.name, layer.macs, _channel_axis(modules[layer.name])
        )
        for layer in table
    ]
    attention = attention_modules(model.module)
    per_module = table.attention_macs // max(2 * len(attention), 1)
    sites += [Site(f"{name}.probs", "post-softmax", None, per_module) for name in attention]
    return sites


def attention_modules(module: nn.Module) -> list[str]:
    """Modules whose forward computes softmax attention through scaled dot-product attention."""
    return [
        name
        for name, child in module.named_modules()
        if hasattr(child, "fused_attn") or type(child).__name__.endswith("SelfAttention")
    ]


@contextmanager
def instrument(module: nn.Module, sites: Sequence[Site], transform: Transform) -> Iterator[None]:
    """Route every site's activation through `transform` while the context is active."""
    modules = dict(module.named_modules())
    handles = []
    for site in sites:
        if site.layer is not None:
            handles.append(
                modules[site.layer].register_forward_pre_hook(_input_hook(site.name, transform))
            )
    probs = {site.name for site in sites if site.layer is None}
    fused: list[tuple[nn.Module, bool]] = []
    for name in attention_modules(module):
        if f"{name}.probs" not in probs:
            continue
        child = modules[name]
        handles.append(child.register_forward_pre_hook(_enter(f"{name}.probs")))
        handles.append(child.register_forward_hook(_leave))
        if hasattr(child, "fused_attn"):
            fused.append((child, child.fused_attn))
            child.fused_attn = True
    previous_sdpa = F.scaled_dot_product_attention
    previous_transform = getattr(_local, "transform", None)
    _local.transform = transform
    F.scaled_dot_product_attention = sdpa_replacement(previous_sdpa, _quantized_probs)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = previous_sdpa
        _local.transform = previous_transform
        for handle in handles:
            handle.remove()
        for child, value in fused:
            child.fused_attn = value


def collect(
    model: LoadedModel, batches: Sequence[Inputs], sites: Sequence[Site], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Calibration samples per site: rows (tokens / pixels x channels) for inputs, a flat sample
    for probabilities; at most ROWS_PER_SITE rows per batch."""
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[torch.Tensor]] = {}
    axes = {site.name: site.channel_axis for site in sites}

    def keep(name: str, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(name, x, axes[name])
        if rows.shape[0] > ROWS_PER_SITE:
            # Drawn on the CPU, whatever the device: the same rows on every machine.
            picked = torch.randperm(rows.shape[0], generator=generator, device="cpu")
            rows = rows[picked[:ROWS_PER_SITE].to(rows.device)]
        samples.setdefault(name, []).append(rows.detach().clone())
        return x

    with torch.no_grad(), instrument(model.module, sites, keep):
        for inputs in batches:
            model(inputs)
    return {name: torch.cat(parts) for name, parts in samples.items()}


@contextmanager
def quantized_activations(
    module: nn.Module, sites: Sequence[Site], quantizers: Mapping[str, ActQuantizer]
) -> Iterator[None]:
    """Run `module` with each site's activation fake-quantized by its quantizer."""
    active = [site for site in sites if site.name in quantizers]
    with instrument(module, active, lambda name, x: quantizers[name](x)):
        yield


def _rows(name: str, x: torch.Tensor, axis: int) -> torch.Tensor:
    if name.endswith(".probs"):
        return x.reshape(-1, 64) if x.numel() % 64 == 0 else x.reshape(-1, 1)
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


def _channel_axis(layer: nn.Module) -> int:
    return 1 if isinstance(layer, CHANNELS_FIRST) else -1


def _producer_role(module: nn.Module) -> str | None:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return "post-ln"
    if isinstance(module, nn.GELU) or "GELU" in name:
        return "post-gelu"
    return None


def _input_hook(name: str, transform: Transform):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (transform(name, args[0]), *args[1:])

    return hook


def _enter(name: str):
    def hook(_module: nn.Module, _args: tuple) -> None:
        _local.site = name

    return hook


def _leave(_module: nn.Module, _args: tuple, _out: object) -> None:
    _local.site = None


def _quantized_probs() -> Combine | None:
    site = getattr(_local, "site", None)
    transform = getattr(_local, "transform", None)
    if site is None or transform is None:
        return None
    return lambda probs, v: transform(site, probs) @ v
