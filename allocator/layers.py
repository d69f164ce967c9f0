"""The layer table: every weight layer bitplan can give a bit-width, with what it costs, and the
weight layers it leaves in float, with the reason.

Quantizable layers are `nn.Linear` and `nn.Conv2d` (grouped and depthwise included) whose forward
multiplies their weight by their input as `allocator.unfold` reads it: checked on the example
batch, so a subclass that standardises its weight or pads its own way is not quantized on trust.
MACs are measured by running that batch through forward hooks (so they follow the real shapes,
tokens and strides); attention matmuls multiply two activations, hold no weights, and are
counted apart in `attention_macs`.

Everything else that multiplies by a weight matrix stays float and is listed in
`LayerTable.floating` (`nn.Conv1d`, `nn.Conv3d`, GPT-2's `Conv1D`, `nn.MultiheadAttention`'s
projections, timm's `CondConv2d`, a custom op): a job quantizes the rest and says what it left.
Embeddings, norms and parameters no weight layer owns (class tokens, position tables, layer
scales) are not weight layers: they stay float and are not listed, as nobody expects them
quantized.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from allocator import unfold
from allocator.errors import BadSpec, UnsupportedModel
from allocator.job_metrics import FloatLayer
from allocator.zoo.base import Inputs, LoadedModel, run_hooked

WEIGHT_LAYER_TYPES = (nn.Linear, nn.Conv2d)
SCALE_BITS = 16
"""Each output channel of a quantized layer stores one float16 scale."""


@dataclass(frozen=True)
class Layer:
    """One quantizable layer. `group` is shared by layers that must take the same bit-width."""

    name: str
    kind: str
    """"linear", "conv2d", "grouped-conv2d" or "depthwise-conv2d" (one group per input channel)."""
    params: int
    out_channels: int
    macs: int
    group: str
    pinned_bits: int | None = None
    groups: int = 1
    """Independent weight groups: each reads only its slice of the input channels."""
    padding: str = unfold.LINEAR
    """How a convolution's forward pads its input (a rule of `allocator.unfold.PADDINGS`)."""

    def storage_bits(self, bits: int) -> int:
        """Codes plus per-channel scales; a float16 layer (bits=16) needs no scales."""
        scales = 0 if bits >= 16 else self.out_channels * SCALE_BITS
        return self.params * bits + scales


@dataclass(frozen=True)
class LayerTable:
    layers: tuple[Layer, ...]
    attention_macs: int = 0
    notes: tuple[str, ...] = field(default=())
    floating: tuple[FloatLayer, ...] = field(default=())
    """Weight layers that stay float (not part of the plan or the budget)."""

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
        unknown = sorted(set(pins) - set(self.names))
        floating = {f.name: f.reason for f in self.floating}
        if unknown:
            detail = "; ".join(
                f"{name} stays float: {floating[name]}" for name in unknown if name in floating
            )
            raise BadSpec(
                f"cannot pin {unknown[:5]}: not quantizable layers of this model"
                f"{' (' + detail + ')' if detail else ''}; pin names from the layer table"
            )
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
    """Every `nn.Linear` / `nn.Conv2d` (subclasses included): the candidates for quantization."""
    for name, child in module.named_modules():
        if isinstance(child, WEIGHT_LAYER_TYPES):
            yield name, child


NEVER_CALLED = (
    "never called as a module in the forward pass (its parent uses the weight directly, as "
    "nn.MultiheadAttention does with out_proj), so bitplan cannot read its inputs"
)
FLOAT_REASONS: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: (
        "nn.MultiheadAttention multiplies in_proj_weight inside its functional forward, which "
        "bitplan does not hook; use separate nn.Linear projections to quantize it"
    ),
    nn.Conv1d: "bitplan quantizes nn.Conv2d only; a kernel-size-1 Conv1d is an nn.Linear",
    nn.Conv3d: "bitplan quantizes nn.Conv2d only",
}
"""Why a known weight layer type stays float; others get `_unknown_reason`."""
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def build_layer_table(
    model: LoadedModel,
    example: Inputs,
    pin_first_last: bool = True,
    pin_bits: int = 8,
    pins: Mapping[str, int] | None = None,
) -> LayerTable:
    """Measure every weight layer on `example` and pin the stem and head unless told not to.

    Layers that share one weight tensor (tied embeddings, reused blocks) fall into one group.
    A model with no layer to quantize raises `UnsupportedModel`, naming what stayed float.
    """
    batch = _batch_size(example)
    macs: dict[str, int] = {}
    paddings: dict[str, str] = {}
    refused: dict[str, str] = {}
    attn_counter = [0]
    handles = []
    candidates = list(weight_layers(model.module))
    for name, child in candidates:
        handles.append(child.register_forward_hook(_measure_hook(name, macs, paddings, refused)))
    for _, child in model.module.named_modules():
        if _is_attention(child):
            handles.append(child.register_forward_hook(_attention_macs_hook(attn_counter)))
    run_hooked(model, example, handles)

    owner: dict[int, str] = {}
    table: list[Layer] = []
    for name, child in candidates:
        if name not in macs or name in refused:
            continue
        weight = child.weight
        table.append(
            Layer(
                name=name,
                kind=_kind(child),
                params=weight.numel(),
                out_channels=weight.shape[0],
                macs=macs[name] // batch,
                group=owner.setdefault(id(weight), name),
                groups=unfold.groups(child),
                padding=paddings[name],
            )
        )
    floating = _floating(model.module, {layer.name for layer in table}, refused)
    if not table:
        listed = "; ".join(f"{f.name} ({f.type}): {f.reason}" for f in floating[:3])
        raise UnsupportedModel(
            f"{model.ref} has no layer bitplan can quantize (nn.Linear or nn.Conv2d computing "
            f"weight x input){': ' + listed if listed else ''}; give a model built from them"
        )
    result = LayerTable(
        tuple(table), attention_macs=attn_counter[0] // batch, floating=tuple(floating)
    )
    chosen: dict[str, int] = {}
    if pin_first_last:
        chosen[table[0].name] = pin_bits
        chosen[table[-1].name] = pin_bits
        chosen.update({name: pin_bits for name in model.pinned_layers if name in result.names})
    chosen.update(pins or {})
    return result.pin(chosen) if chosen else result


def _kind(layer: nn.Module) -> str:
    if not isinstance(layer, nn.Conv2d):
        return "linear"
    if layer.groups == 1:
        return "conv2d"
    return "depthwise-conv2d" if layer.groups == layer.in_channels else "grouped-conv2d"


def _measure_hook(
    name: str, macs: dict[str, int], paddings: dict[str, str], refused: dict[str, str]
):
    """Count the layer's MACs and find how it reads its input, or refuse it."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        try:
            padding = unfold.match_padding(module, args[0] if args else None, out)
        except unfold.Unreadable as exc:
            refused.setdefault(name, str(exc))
            return
        if paddings.setdefault(name, padding) != padding:
            refused.setdefault(name, "its calls pad their inputs in different ways")
        macs[name] = macs.get(name, 0) + out.numel() * module.weight[0].numel()

    return hook


def _floating(
    module: nn.Module, quantized: set[str], refused: Mapping[str, str]
) -> list[FloatLayer]:
    """Every module holding a weight matrix that is not in the table, with the reason.

    A weight is a parameter named `weight` or `*_weight` / `weight_*` (in_proj_weight,
    weight_ih_l0) with two or more dimensions; embeddings are not weight layers.
    """
    floating = []
    for name, child in module.named_modules():
        if name in quantized or isinstance(child, EMBEDDING_TYPES):
            continue
        weights = [
            p
            for key, p in child.named_parameters(recurse=False)
            if p.dim() >= 2
            and (key == "weight" or key.endswith("_weight") or key.startswith("weight_"))
        ]
        if not weights or type(child).__name__.endswith("Embedding"):
            continue
        if isinstance(child, WEIGHT_LAYER_TYPES):
            reason = refused.get(name, NEVER_CALLED)
        else:
            reason = FLOAT_REASONS.get(type(child)) or _unknown_reason(child)
        params = sum(p.numel() for p in weights)
        floating.append(FloatLayer(name, type(child).__name__, params, reason))
    return floating


def _unknown_reason(layer: nn.Module) -> str:
    return (
        f"{type(layer).__name__} is not nn.Linear or nn.Conv2d, the layers bitplan has "
        "quantization rules for"
    )


def _batch_size(example: Inputs) -> int:
    if isinstance(example, torch.Tensor):
        return example.shape[0]
    return next(iter(example.values())).shape[0]
