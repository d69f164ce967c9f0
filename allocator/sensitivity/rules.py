"""LRP rules as a switchable backward pass, so relevance and true gradients share one forward.

captum's LRP cannot run timm ViTs (no rule for Identity/LayerNorm/GELU, functional attention is
invisible, relevance explodes to NaN once patched: see shared/design/LRP.md). What works is LRP
as a *modified gradient* followed by gradient x input (CP-LRP / AttnLRP):

- LayerNorm (channels-last, or channels-first as timm's LayerNorm2d) and GroupNorm: the standard
  deviation is a constant in the backward pass, so the normalisation is a linear map of its input
  and its affine bias absorbs the rest;
- RMSNorm (Llama and its kin): the same, `x * (f(x) / x).detach()`: the root mean square and the
  gain are constants, and with no mean or bias there is nothing else;
- element-wise non-linearities (GELU, SiLU, ReLU6, StarReLU, ...): the identity rule on
  `f(x) - f(0)`, `x * ((f(x) - f(0)) / x).detach() + f(0)`, the offset a constant like a bias;
- RoBERTa-style classification heads (`out_proj(tanh(dense(x)))` with a functional tanh): the
  identity rule on the tanh, read from the layers around it;
- gated MLPs (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`): the product of two activations
  takes the uniform rule, half of its relevance to each factor; plain gradient x input would
  hand each factor all of it and double the relevance at every such block;
- embedding normalisation (`x / ||x||`): the norm is a constant;
- gated products (`x * gate(f(x))`: squeeze-excitation and its kin, recognised by an activation
  module named `gate`): the gate is a constant weight, so all relevance of the product flows to
  `x`; gradient x input would hand the gate branch a second copy of it;
- softmax attention: the attention probabilities are constants (CP-LRP), so all relevance of
  `attn @ v` flows to `v`; this is exactly conservative;
- linear, convolution, ReLU, BatchNorm (eval), residual adds: plain gradient x input.

In-place activations are switched to out-of-place while the LRP graph is built: an in-place op
overwrites its input, so the identity rule (and the BatchNorm constant `lrp.py` reads where a
fused BatchNormAct enters its activation) would see the activation's output instead.

Each hooked site computes *both* outputs in the forward pass (they are equal in value) and joins
them with `_Switch`, whose backward routes the incoming gradient to the true graph or to the LRP
graph depending on `RuleState.backward`. One forward therefore serves a true-gradient backward
(Fisher, Hutchinson) and a relevance backward (LRP). Attention is reached by replacing
`torch.nn.functional.scaled_dot_product_attention` while the context is active (timm and
Hugging Face both call it by attribute); the replacement is the math formulation, which also
supports the double backward Hutchinson needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from allocator.attention import ORIGINAL_SDPA, Combine, sdpa_replacement

Backward = Literal["true", "lrp"]

ELEMENTWISE_ACTIVATIONS = (
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.LeakyReLU,
    nn.Softplus,
)
"""Take the identity rule: none is positively homogeneous (f(x) != f'(x) x; ReLU6 and
Hardtanh saturate), so gradient x input through them would lose relevance. nn.ReLU6 is a
Hardtanh."""

ACTIVATION_NAMES = ("GELU", "SiLU", "ReLU", "Swish", "Sigmoid", "Tanh", "Mish")
"""Class-name tokens of activations outside torch.nn (timm's, Hugging Face's); same rule."""


@dataclass
class RuleState:
    """Which graph the next backward pass follows, and whether the LRP graph is built at all.

    `offsets`, when a list, collects the constants the LRP graph adds, as leaves that absorb
    relevance as biases do, for the conservation check to count; None (the default) adds them
    as plain constants, so a long sensitivity pass keeps none of them."""

    backward: Backward = "true"
    build_lrp: bool = True
    offsets: list[torch.Tensor] | None = None


_local = threading.local()


def _state() -> RuleState | None:
    return getattr(_local, "state", None)


class _Switch(torch.autograd.Function):
    """Identity in value; the gradient goes to the true or the LRP operand."""

    @staticmethod
    def forward(ctx, true_out: torch.Tensor, lrp_out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.state = _state()
        return true_out.view_as(true_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        state = ctx.state
        if state is not None and state.backward == "lrp":
            return None, grad
        return grad, None


def _building() -> bool:
    state = _state()
    return state is not None and state.build_lrp and torch.is_grad_enabled()


def _switch(true_out: torch.Tensor, make_lrp: Callable[[], torch.Tensor]) -> torch.Tensor:
    if not _building():
        return true_out
    return _Switch.apply(true_out, make_lrp())


def _standardized(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x - mean) / std over `dims`, the standard deviation a constant: a linear map of x
    without offset, so gradient x input through it conserves relevance."""
    mean = x.mean(dim=dims, keepdim=True)
    std = torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps).detach()
    return (x - mean) / std


def _affine(y: torch.Tensor, module: nn.Module, channels_first: bool) -> torch.Tensor:
    """The norm's elementwise affine; channels-first layouts broadcast it over dims 2+."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    shape = (-1, *(1,) * (y.dim() - 2)) if channels_first else (-1,)
    if weight is not None:
        y = y * (weight.view(shape) if channels_first else weight)
    if bias is not None:
        y = y + (bias.view(shape) if channels_first else bias)
    return y


def _layer_norm_candidates(module: nn.LayerNorm, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """nn.LayerNorm normalises the trailing dims; timm's LayerNorm2d (same class, its own
    forward) normalises dim 1 of NCHW. Which one a module does is read off its output."""
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[-len(shape) :]) == shape:
        dims = tuple(range(-len(shape), 0))
        yield _affine(_standardized(x, dims, module.eps), module, channels_first=False)
    if len(shape) == 1 and x.dim() > 2 and x.shape[1] == shape[0]:
        yield _affine(_standardized(x, (1,), module.eps), module, channels_first=True)


def _group_norm_candidates(module: nn.GroupNorm, x: torch.Tensor) -> Iterator[torch.Tensor]:
    grouped = x.reshape(x.shape[0], module.num_groups, -1)
    y = _standardized(grouped, (-1,), module.eps).view_as(x)
    yield _affine(y, module, channels_first=True)


def _normalization_hook(
    candidates: Callable[[nn.Module, torch.Tensor], Iterator[torch.Tensor]],
) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
    """The first candidate LRP graph whose value is the module's output (to the square root of
    the dtype's precision: a wrong layout is off by the order of the values); none that is
    leaves the module on its true gradient (a layout this rule does not know)."""

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not _building():
            return out
        tolerance = torch.finfo(out.dtype).eps ** 0.5
        for lrp in candidates(module, args[0]):
            if lrp.shape == out.shape and torch.allclose(lrp, out, tolerance, tolerance):
                return _Switch.apply(out, lrp)
        return out

    return hook


def _identity_rule(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (an element-wise function of `x`) as `x` times a constant: relevance passes
    through unchanged."""
    safe = torch.where(x.abs() > 1e-6, x, torch.ones_like(x))
    ratio = torch.where(x.abs() > 1e-6, out / safe, torch.full_like(x, 0.5))
    return x * ratio.detach()


def _identity_rule_hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The identity rule over a whole module whose output is its input times something: an
    RMSNorm, or a gated product `x * gate(...)` (the gate a constant weight)."""
    if not isinstance(out, torch.Tensor) or out.shape != args[0].shape:
        return out
    return _switch(out, lambda: _identity_rule(args[0], out))


def _activation_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The identity rule on `f(x) - f(0)`; the offset `f(0)` (a sigmoid's 1/2, StarReLU's bias)
    is a constant that absorbs its share, as a bias does. Left in the ratio `f(x) / x` it
    would grow without bound as x nears 0 and the relevance upstream would cancel in float."""
    state, x = _state(), args[0]
    if state is None or not _building() or out.shape != x.shape:
        return out
    with torch.no_grad():
        offset = module.forward(torch.zeros_like(x[:1]))
    if not offset.any():
        return _Switch.apply(out, _identity_rule(x, out))
    if state.offsets is not None:
        offset = offset.requires_grad_(True)
        state.offsets.append(offset)
    return _Switch.apply(out, _identity_rule(x, out - offset.detach()) + offset)


def _classification_head_hooks(module: nn.Module) -> list:
    """The identity rule on the `torch.tanh` a RoBERTa-style head calls between `dense` and
    `out_proj`: a function call no module hook sees, read from the two layers around it."""
    seen: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        seen["dense"] = out

    def squashed(_module: nn.Module, args: tuple) -> tuple | None:
        dense = seen.pop("dense", None)
        if dense is None or dense.shape != args[0].shape:
            return None
        return (_switch(args[0], lambda: _identity_rule(dense, args[0])), *args[1:])

    return [
        module.dense.register_forward_hook(keep),
        module.out_proj.register_forward_pre_hook(squashed),
    ]


def _gated_mlp_hooks(module: nn.Module) -> list:
    """The uniform rule on `act_fn(gate_proj(x)) * up_proj(x)`, the input of `down_proj`.

    The factors are read off `act_fn` and `up_proj` as they leave them (the gate after its own
    identity rule), so these hooks go on after the activation hooks.
    """
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            seen[key] = out

        return hook

    def product(_module: nn.Module, args: tuple) -> tuple | None:
        gate, up = seen.pop("gate", None), seen.pop("up", None)
        if gate is None or up is None or not gate.shape == up.shape == args[0].shape:
            return None

        def halves() -> torch.Tensor:
            return 0.5 * (gate * up.detach() + gate.detach() * up)

        return (_switch(args[0], halves), *args[1:])

    return [
        module.act_fn.register_forward_hook(keep("gate")),
        module.up_proj.register_forward_hook(keep("up")),
        module.down_proj.register_forward_pre_hook(product),
    ]


def _normalize_hooks(module: nn.Module) -> list:
    """sentence-transformers' Normalize rewrites its features dict in place: keep its input."""
    key_in = getattr(module, "module_input_name", "sentence_embedding")
    key_out = getattr(module, "module_output_name", "sentence_embedding")
    seen: dict[str, torch.Tensor] = {}

    def pre(_module: nn.Module, args: tuple) -> None:
        if isinstance(args[0], dict) and key_in in args[0]:
            seen["x"] = args[0][key_in]

    def post(_module: nn.Module, _args: tuple, out: object) -> object:
        raw = seen.pop("x", None)
        if raw is None or not isinstance(out, dict) or key_out not in out:
            return out
        out[key_out] = _switch(
            out[key_out], lambda: raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12).detach()
        )
        return out

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _cp_lrp() -> Combine | None:
    """CP-LRP while the rules are active: the probabilities are constants for relevance."""
    if _state() is None:
        return None
    return lambda probs, v: _switch(probs @ v, lambda: probs.detach() @ v)


attention = sdpa_replacement(ORIGINAL_SDPA, _cp_lrp)
"""The math form of scaled dot-product attention with the CP-LRP rule attached."""


def _is_normalize(module: nn.Module) -> bool:
    return type(module).__name__ == "Normalize"


def _is_rms_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")


def _is_classification_head(module: nn.Module) -> bool:
    return type(module).__name__.endswith("ClassificationHead") and all(
        isinstance(getattr(module, name, None), nn.Linear) for name in ("dense", "out_proj")
    )


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, name, None), nn.Module)
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn")
    )


def _is_activation(module: nn.Module) -> bool:
    """An element-wise non-linearity other than ReLU, whose gradient x input already is the
    identity rule. Custom ones (timm's StarReLU `s * relu(x)**2 + b`, Hugging Face's GELU
    classes, timm's own Swish/HardSigmoid) are known by their class name, and hold no layer
    with weights (a `SwishMlp` would be a block, not an activation)."""
    if isinstance(module, ELEMENTWISE_ACTIVATIONS):
        return True
    name = type(module).__name__
    return (
        not isinstance(module, nn.ReLU)
        and any(token in name for token in ACTIVATION_NAMES)
        and not any(any(True for _ in child.parameters()) for child in module.children())
    )


def _is_gated_product(module: nn.Module) -> bool:
    gate = getattr(module, "gate", None)
    return isinstance(gate, nn.Module) and _is_activation(gate)


def _forward_hook(hook: Callable[..., object]) -> Callable[[nn.Module], list]:
    return lambda module: [module.register_forward_hook(hook)]


RULES: tuple[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], list]], ...] = (
    (
        lambda m: isinstance(m, nn.LayerNorm),
        _forward_hook(_normalization_hook(_layer_norm_candidates)),
    ),
    (
        lambda m: isinstance(m, nn.GroupNorm),
        _forward_hook(_normalization_hook(_group_norm_candidates)),
    ),
    (_is_activation, _forward_hook(_activation_hook)),
    (_is_rms_norm, _forward_hook(_identity_rule_hook)),
    (_is_gated_product, _forward_hook(_identity_rule_hook)),
    (_is_normalize, _normalize_hooks),
    (_is_classification_head, _classification_head_hooks),
)
"""(recognises a module, installs its hooks); the first match wins. Gated MLPs come after all of
these: their hooks read the activation's output as the activation hook left it."""


def _override(module: nn.Module, attribute: str, value: bool) -> list[tuple[nn.Module, bool]]:
    """Set a boolean `attribute` on every submodule that has one; the previous values."""
    changed = []
    for child in module.modules():
        previous = getattr(child, attribute, None)
        if isinstance(previous, bool):
            changed.append((child, previous))
            setattr(child, attribute, value)
    return changed


@contextmanager
def relevance_rules(module: nn.Module, build_lrp: bool = True) -> Iterator[RuleState]:
    """Install the rule switches on `module` (and attention globally, for this thread only).

    timm attention is forced onto its fused branch so that it calls the replaced function, and
    in-place activations run out of place while the LRP graph is built.
    """
    state = RuleState(build_lrp=build_lrp)
    handles = []
    for child in module.modules():
        installer = next((install for matches, install in RULES if matches(child)), None)
        if installer is not None:
            handles.extend(installer(child))
    for child in module.modules():
        if _is_gated_mlp(child):
            handles.extend(_gated_mlp_hooks(child))
    overrides = {"fused_attn": _override(module, "fused_attn", True)}
    if build_lrp:
        overrides["inplace"] = _override(module, "inplace", False)
    previous = _state()
    _local.state = state
    F.scaled_dot_product_attention = attention
    try:
        yield state
    finally:
        _local.state = previous
        for handle in handles:
            handle.remove()
        for attribute, changed in overrides.items():
            for child, value in changed:
                setattr(child, attribute, value)
