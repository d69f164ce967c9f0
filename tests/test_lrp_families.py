"""LRP conservation on the CNN families whose blocks need more than gradient x input.

Each family brings a construct the plain rules got wrong: in-place activations fused into
timm's BatchNormAct2d (MobileNet, EfficientNet, ResNeXt, MobileViT), squeeze-excitation gates
(MobileNetV3, EfficientNet), channels-first LayerNorm and GroupNorm (ConvNeXt, PoolFormer) and
StarReLU's offset (PoolFormer). Weights are random, but BatchNorm statistics and every bias are
randomised too: at timm's initialisation they are zero, and the constants that must absorb
relevance (the BatchNorm shift, an activation's f(0)) would go untested.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from allocator.sensitivity.lrp import conservation
from allocator.sensitivity.rules import relevance_rules
from allocator.zoo.base import LoadedModel

TOLERANCE = 0.05

FAMILIES = {
    "resnext": "resnext26ts",
    "mobilenetv2": "mobilenetv2_050",
    "mobilenetv3": "mobilenetv3_small_050",
    "efficientnet": "test_efficientnet",
    "efficientnet-lite": "tf_efficientnet_lite0",
    "convnext": "test_convnext",
    "poolformer": "poolformerv2_s12",
    "mobilevit": "mobilevit_xxs",
    "resnet": "test_resnet",
}


def _randomise_constants(module: nn.Module, generator: torch.Generator) -> None:
    """Trained-looking BatchNorm statistics and non-zero biases."""
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                child.running_mean.normal_(0, 0.2, generator=generator)
                child.running_var.uniform_(0.5, 2.0, generator=generator)
                if child.weight is not None:
                    child.weight.uniform_(0.5, 1.5, generator=generator)
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.05, generator=generator)


def _family(name: str) -> tuple[LoadedModel, torch.Tensor]:
    torch.manual_seed(0)
    module = timm.create_model(FAMILIES[name], pretrained=False, num_classes=10).eval()
    _randomise_constants(module, torch.Generator().manual_seed(1))
    model = LoadedModel(ref=name, module=module, task="classification", input_kind="image")
    return model, torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_relevance_is_conserved(family: str) -> None:
    model, x = _family(family)
    check = conservation(model, x)
    assert check.relative_error < TOLERANCE, check


def test_activations_run_out_of_place_under_the_rules_only() -> None:
    """Same outputs either way; the modules' own flags are back once the rules are off."""
    model, x = _family("mobilenetv2")

    def flags() -> dict[str, bool]:
        return {
            name: child.inplace
            for name, child in model.module.named_modules()
            if isinstance(getattr(child, "inplace", None), bool)
        }

    before = flags()
    with torch.no_grad():
        plain = model(x)
    with relevance_rules(model.module):
        torch.testing.assert_close(model(x), plain)
        assert not any(flags().values())
    assert any(before.values()) and flags() == before


class _Gated(nn.Module):
    """Squeeze-excitation in its barest form: x * sigmoid(fc(mean(x)))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))


def _relevance(module: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(relevance of the output sum, relevance at `x`) through the rules."""
    x = x.clone().requires_grad_(True)
    with relevance_rules(module) as state:
        out = module(x)
        state.backward = "lrp"
        (grad,) = torch.autograd.grad(out.sum(), [x])
    return float(out.detach().sum()), float((x.detach() * grad).sum())


def test_a_gate_is_a_constant_weight() -> None:
    """All relevance of the gated product reaches x; none is handed to the gate's branch."""
    torch.manual_seed(0)
    explained, at_input = _relevance(_Gated(4).eval(), torch.randn(2, 4, 5, 5))
    assert at_input == pytest.approx(explained, rel=1e-4)


@pytest.mark.parametrize(
    "norm",
    [timm.layers.LayerNorm2d(8), nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.GroupNorm(1, 8)],
    ids=["layernorm2d", "layernorm", "groupnorm", "groupnorm1"],
)
def test_norms_conserve_in_either_layout(norm: nn.Module) -> None:
    """The width equals the channel count, so the layout is known only from the output."""
    with torch.no_grad():
        norm.bias.zero_()
    torch.manual_seed(0)
    explained, at_input = _relevance(norm.eval(), torch.randn(2, 8, 3, 8))
    assert at_input == pytest.approx(explained, rel=1e-4, abs=1e-4)
