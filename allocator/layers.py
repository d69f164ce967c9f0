"""The layer table: every weight layer bitplan can give a bit-width, with what it costs.

Only `nn.Linear` and `nn.Conv2d` carry quantizable weights here. MACs are measured by running one
batch through forward hooks (so they follow the real shapes, tokens and strides); attention
matmuls multiply two activations, hold no weights, and are counted apart in `attention_macs`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from allocator.zoo.base import Inputs, LoadedModel

WEIGHT_LAYER_TYPES = (nn.Linear, nn.Conv2d)
SCALE_BITS = 16
"""Each output channel of a quantized layer stores one float16 scale."""


@dataclass(frozen=True)
class Layer:
    """One quantizable layer. `group` is shared by layers that must take the same bit-width."""

    name: str
    kind: str
    params: int
    out_channels: int
    macs: int
    group: str
    pinned_bits: int | None = None

    def storage_bits(self, bits: int) -> int:
        """Codes plus per-channel scales; a float16 layer (bits=16) needs no scales."""
        scales = 0 if bits >= 16 else self.out_channels * SCALE_BITS
        return self.params * bits + scales


@dataclass(frozen=True)
class LayerTable:
    layers: tuple[Layer, ...]
    attention_macs: int = 0
    notes: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def storage_bits(self, bits: Mapping[str, int]) -> int:
        return sum(layer.storage_bits(bits[layer.name]) for layer in self.layers)

    def uniform_storage_bits(self, bits: float) -> float:
        """Storage with every free layer at `bits` (fractional allowed) and pinned groups at their
        pin: the meaning of `avg-bits=`, so that the uniform plan of the same width, which keeps
        the same pins, fits it exactly."""
        pinned = self.pinned_widths()
        return sum(
            layer.storage_bits(pinned[layer.name])
            if layer.name in pinned
            else layer.params * bits + (layer.out_channels * SCALE_BITS if bits < 16 else 0)
            for layer in self.layers
        )

    def pinned_widths(self) -> dict[str, int]:
        """Layer name -> width for every layer whose tied group has a pinned member (a tie makes
        the pin hold for the whole group)."""
        pins: dict[str, set[int]] = {}
        for layer in self.layers:
            if layer.pinned_bits is not None:
                pins.setdefault(layer.group, set()).add(layer.pinned_bits)
        conflicts = {group: sorted(widths) for group, widths in pins.items() if len(widths) > 1}
        if conflicts:
            raise ValueError(f"tied layers pinned to different widths: {conflicts}")
        return {layer.name: min(pins[layer.group]) for layer in self.layers if layer.group in pins}

    def uniform(self, bits: int) -> dict[str, int]:
        """The uniform plan: every layer at `bits` but pinned groups at their pin."""
        pinned = self.pinned_widths()
        return {layer.name: pinned.get(layer.name, bits) for layer in self.layers}

    def pin(self, pins: Mapping[str, int]) -> LayerTable:
        """Return a table with the given layers fixed to a bit-width (name -> bits)."""
        unknown = set(pins) - set(self.names)
        if unknown:
            raise KeyError(f"cannot pin unknown layers: {sorted(unknown)}")
        return replace(
            self,
            layers=tuple(
                replace(layer, pinned_bits=pins[layer.name]) if layer.name in pins else layer
                for layer in self.layers
            ),
        )

    def get(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def _attention_macs_hook(counter: list[int]):
    """Count q@k^T and attn@v MACs from an attention module's input (B, N, C)."""

    def hook(module: nn.Module, args: tuple, _out: object) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return
        batch, tokens, channels = x.shape
        counter[0] += 2 * batch * tokens * tokens * channels

    return hook


def _is_attention(module: nn.Module) -> bool:
    """timm Attention / WindowAttention and Hugging Face BERT self-attention."""
    return (hasattr(module, "num_heads") and hasattr(module, "qkv")) or (
        hasattr(module, "num_attention_heads") and hasattr(module, "query")
    )


def weight_layers(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, child in module.named_modules():
        if isinstance(child, WEIGHT_LAYER_TYPES):
            yield name, child


def build_layer_table(
    model: LoadedModel,
    example: Inputs,
    pin_first_last: bool = True,
    pin_bits: int = 8,
    pins: Mapping[str, int] | None = None,
) -> LayerTable:
    """Measure every weight layer on `example` and pin the stem and head unless told not to.

    Layers that share one weight tensor (tied embeddings, reused blocks) fall into one group.
    """
    batch = _batch_size(example)
    macs: dict[str, int] = {}
    attn_counter = [0]
    handles = []
    layers = list(weight_layers(model.module))
    if not layers:
        raise ValueError(f"{model.ref} has no nn.Linear or nn.Conv2d layer to quantize")
    for name, child in layers:
        handles.append(child.register_forward_hook(_macs_hook(name, macs)))
    for _, child in model.module.named_modules():
        if _is_attention(child):
            handles.append(child.register_forward_hook(_attention_macs_hook(attn_counter)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()

    owner: dict[int, str] = {}
    table: list[Layer] = []
    for name, child in layers:
        if name not in macs:
            continue
        weight = child.weight
        group = owner.setdefault(id(weight), name)
        table.append(
            Layer(
                name=name,
                kind="conv2d" if isinstance(child, nn.Conv2d) else "linear",
                params=weight.numel(),
                out_channels=weight.shape[0],
                macs=macs[name] // batch,
                group=group,
            )
        )
    result = LayerTable(tuple(table), attention_macs=attn_counter[0] // batch)
    chosen: dict[str, int] = {}
    if pin_first_last:
        chosen[table[0].name] = pin_bits
        chosen[table[-1].name] = pin_bits
        chosen.update({name: pin_bits for name in model.pinned_layers if name in result.names})
    chosen.update(pins or {})
    return result.pin(chosen) if chosen else result


def _macs_hook(name: str, macs: dict[str, int]):
    def hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            macs[name] = macs.get(name, 0) + out.numel() * per_output
        else:
            macs[name] = macs.get(name, 0) + out.numel() * module.in_features

    return hook


def _batch_size(example: Inputs) -> int:
    if isinstance(example, torch.Tensor):
        return example.shape[0]
    return next(iter(example.values())).shape[0]
