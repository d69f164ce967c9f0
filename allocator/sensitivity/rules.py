"""LRP rules as a switchable backward pass, so relevance and true gradients share one forward.

captum's LRP cannot run timm ViTs (no rule for Identity/LayerNorm/GELU, functional attention is
invisible, relevance explodes to NaN once patched: see shared/design/LRP.md). What works is LRP
as a *modified gradient* followed by gradient x input (CP-LRP / AttnLRP):

- LayerNorm: the identity rule, i.e. the standard deviation is a constant in the backward pass;
- RMSNorm (Llama and its kin): the same, `x * (f(x) / x).detach()`: the root mean square and the
  gain are constants, and with no mean or bias there is nothing else;
- element-wise non-linearities (GELU, SiLU, ...): the identity rule, `x * (f(x) / x).detach()`;
- RoBERTa-style classification heads (`out_proj(tanh(dense(x)))` with a functional tanh): the
  identity rule on the tanh, read from the layers around it;
- gated MLPs (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`): the product of two activations
  takes the uniform rule, half of its relevance to each factor; plain gradient x input would
  hand each factor all of it and double the relevance at every such block;
- embedding normalisation (`x / ||x||`): the norm is a constant;
- softmax attention: the attention probabilities are constants (CP-LRP), so all relevance of
  `attn @ v` flows to `v`; this is exactly conservative;
- linear, convolution, ReLU, BatchNorm (eval), residual adds: plain gradient x input.

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
from collections.abc import Iterator
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


@dataclass
class RuleState:
    """Which graph the next backward pass follows, and whether the LRP graph is built at all."""

    backward: Backward = "true"
    build_lrp: bool = True


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


def _switch(true_out: torch.Tensor, make_lrp) -> torch.Tensor:
    state = _state()
    if state is None or not state.build_lrp or not torch.is_grad_enabled():
        return true_out
    return _Switch.apply(true_out, make_lrp())


def _layer_norm_hook(module: nn.LayerNorm, args: tuple, out: torch.Tensor) -> torch.Tensor:
    x = args[0]
    dims = tuple(range(-len(module.normalized_shape), 0))

    def lrp() -> torch.Tensor:
        mean = x.mean(dim=dims, keepdim=True)
        std = torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + module.eps).detach()
        y = (x - mean) / std
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
        return y

    return _switch(out, lrp)


def _identity_rule(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (an element-wise function of `x`) as `x` times a constant: relevance passes
    through unchanged."""
    safe = torch.where(x.abs() > 1e-6, x, torch.ones_like(x))
    ratio = torch.where(x.abs() > 1e-6, out / safe, torch.full_like(x, 0.5))
    return x * ratio.detach()


def _identity_rule_hook(_module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return _switch(out, lambda: _identity_rule(args[0], out))


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
    name = type(module).__name__
    return isinstance(module, ELEMENTWISE_ACTIVATIONS) or (
        "GELU" in name or name in {"SiLUActivation", "NewGELUActivation", "FastGELUActivation"}
    )


@contextmanager
def relevance_rules(module: nn.Module, build_lrp: bool = True) -> Iterator[RuleState]:
    """Install the rule switches on `module` (and attention globally, for this thread only).

    timm attention is forced onto its fused branch so that it calls the replaced function.
    """
    state = RuleState(build_lrp=build_lrp)
    handles = []
    fused: list[tuple[nn.Module, bool]] = []
    for child in module.modules():
        if isinstance(child, nn.LayerNorm) and "2d" not in type(child).__name__.lower():
            handles.append(child.register_forward_hook(_layer_norm_hook))
        elif _is_activation(child) or _is_rms_norm(child):
            handles.append(child.register_forward_hook(_identity_rule_hook))
        elif _is_normalize(child):
            handles.extend(_normalize_hooks(child))
        elif _is_classification_head(child):
            handles.extend(_classification_head_hooks(child))
        if hasattr(child, "fused_attn"):
            fused.append((child, child.fused_attn))
            child.fused_attn = True
    for child in module.modules():
        if _is_gated_mlp(child):
            handles.extend(_gated_mlp_hooks(child))
    previous = _state()
    _local.state = state
    F.scaled_dot_product_attention = attention
    try:
        yield state
    finally:
        _local.state = previous
        for handle in handles:
            handle.remove()
        for child, value in fused:
            child.fused_attn = value
