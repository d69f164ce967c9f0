"""Bit plans, `apply`, and the packed artifact: `load_packed(pack(m, p))` must equal `apply(m, p)`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from allocator.apply import (
    applied_plan,
    apply,
    load_packed,
    pack,
    pack_codes,
    unpack_codes,
)
from allocator.errors import UnknownMethod, WeightsMismatch
from allocator.layers import weight_layers
from allocator.plan import BitPlan, LayerPlan
from allocator.quant.weight import SUPPORTED_BITS, fake_quantize

PACKED_BITS = [b for b in SUPPORTED_BITS if b < 16]


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.depthwise(torch.relu(self.conv(x))))
        return self.head(x.mean(dim=(2, 3)))


def _cnn(seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def _vit(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()


def _mixed_plan(model: nn.Module) -> BitPlan:
    """Every supported width, both clip rules, and bias corrections on layers with and without
    a bias."""
    layers = {}
    for i, (name, layer) in enumerate(weight_layers(model)):
        bits = SUPPORTED_BITS[i % len(SUPPORTED_BITS)]
        correction = None
        if i % 2 == 0:
            correction = torch.linspace(-0.1, 0.1, layer.weight.shape[0]).tolist()
        layers[name] = LayerPlan(bits, clip=("max", "mse")[i % 2], bias_correction=correction)
    return BitPlan(layers=layers, meta={"model": "test", "budget": "avg-bits=4"})


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(PACKED_BITS),
    data=st.data(),
)
def test_pack_unpack_round_trip(bits: int, data: st.DataObject) -> None:
    values = data.draw(
        st.lists(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1), min_size=0, max_size=300)
    )
    codes = torch.tensor(values, dtype=torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (len(values) * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, len(values)), codes)


def test_packing_is_dense_and_least_significant_bit_first() -> None:
    four = torch.tensor([-7, -6], dtype=torch.int8)  # offset codes 1, 2
    assert pack_codes(four, 4).tolist() == [0x21]
    three = torch.tensor([-3, -2, -1], dtype=torch.int8)  # offset codes 1, 2, 3
    assert pack_codes(three, 3).tolist() == [0b11_010_001, 0b0]  # the top bit of 3 spills over
    eight = torch.tensor([-128, 0, 127], dtype=torch.int8)
    assert pack_codes(eight, 8).tolist() == [0, 128, 255]


def test_unpack_rejects_wrong_byte_count() -> None:
    with pytest.raises(WeightsMismatch, match="cannot hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 10)


def test_plan_round_trips_through_json() -> None:
    plan = _mixed_plan(_cnn(0))
    plan = BitPlan(layers=plan.layers, activations={"blocks.0": {"bits": 8}}, meta=plan.meta)
    assert BitPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_plan_from_bits_and_back() -> None:
    plan = BitPlan.from_bits({"a": 4, "b": 8}, clip="mse", meta={"method": "fisher"})
    assert plan.weight_bits == {"a": 4, "b": 8}
    assert plan.layers["a"] == LayerPlan(4, "mse")


def test_plan_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match="weight bits"):
        LayerPlan(7, "max")
    with pytest.raises(UnknownMethod, match="known"):
        LayerPlan(4, "gptq")
    with pytest.raises(ValueError, match="unknown bit plan fields"):
        BitPlan.from_dict({"layers": {}, "weights": {}})


def test_apply_replaces_planned_weights_on_a_copy() -> None:
    model = _cnn(0)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    plan = BitPlan({"conv": LayerPlan(3, "mse"), "head": LayerPlan(16, "max")})
    quantized = apply(model, plan)
    assert quantized is not model
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert torch.equal(quantized.conv.weight, fake_quantize(model.conv.weight, 3, "mse"))
    assert torch.equal(quantized.head.weight, model.head.weight.half().float())
    assert torch.equal(quantized.stem.weight, model.stem.weight)
    assert applied_plan(quantized) == plan
    assert applied_plan(model) is None
    assert apply(model, plan, inplace=True) is model


def test_apply_adds_bias_correction_creating_missing_biases() -> None:
    model = _cnn(0)
    corr_conv = [0.5] * 16
    corr_stem = [float(i) for i in range(8)]
    plan = BitPlan(
        {
            "conv": LayerPlan(8, "max", bias_correction=corr_conv),
            "stem": LayerPlan(8, "max", bias_correction=corr_stem),
        }
    )
    quantized = apply(model, plan)
    assert torch.equal(quantized.conv.bias, model.conv.bias + 0.5)
    assert model.stem.bias is None
    assert torch.equal(quantized.stem.bias, torch.tensor(corr_stem))


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"nope": LayerPlan(4)}, "nope"),
        ({"bn": LayerPlan(4)}, "bn"),
        ({"head": LayerPlan(4, bias_correction=[0.0])}, "output channels"),
    ],
)
def test_apply_refuses_plans_that_do_not_fit(layers: dict[str, LayerPlan], message: str) -> None:
    with pytest.raises(WeightsMismatch, match=message):
        apply(_cnn(0), BitPlan(layers))


@pytest.mark.parametrize("build", [_cnn, _vit], ids=["cnn", "vit"])
def test_packed_artifact_reproduces_applied_model_exactly(
    build: Callable[[int], nn.Module], tmp_path: Path
) -> None:
    model = build(0)
    plan = _mixed_plan(model)
    applied = apply(model, plan)
    summary = pack(model, plan, tmp_path / "model.safetensors")
    assert summary["file_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]

    loaded, loaded_plan = load_packed(tmp_path / "model.safetensors", build(1))
    assert loaded_plan == plan
    assert applied_plan(loaded) == plan
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), applied(x))
        assert not torch.equal(build(1)(x), applied(x))
    applied_state, loaded_state = applied.state_dict(), loaded.state_dict()
    assert applied_state.keys() == loaded_state.keys()
    assert all(torch.equal(loaded_state[k], v) for k, v in applied_state.items())


def test_artifact_shrinks_with_bits(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(512, 256, bias=False))
    float_bytes = 512 * 256 * 4
    sizes = {}
    for bits in (4, 16):
        summary = pack(model, BitPlan.from_bits({"0": bits}), tmp_path / f"{bits}.safetensors")
        sizes[bits] = summary
    assert sizes[4]["code_bytes"] == float_bytes // 8
    assert sizes[4]["scale_bytes"] == 256 * 2
    assert sizes[4]["file_bytes"] < float_bytes // 8 + 256 * 2 + 2048
    assert sizes[16]["float16_bytes"] == float_bytes // 2
    assert sizes[16]["code_bytes"] == 0


def test_pack_takes_float_applied_or_loaded_model_alike(tmp_path: Path) -> None:
    model = _cnn(0)
    plan = _mixed_plan(model)
    pack(model, plan, tmp_path / "float.safetensors")
    applied = apply(model, plan)
    pack(applied, plan, tmp_path / "applied.safetensors")
    loaded, _ = load_packed(tmp_path / "applied.safetensors", _cnn(1))
    pack(loaded, plan, tmp_path / "loaded.safetensors")
    reference = load_file(tmp_path / "float.safetensors")
    for name in ("applied", "loaded"):
        other = load_file(tmp_path / f"{name}.safetensors")
        assert other.keys() == reference.keys()
        assert all(torch.equal(other[k], v) for k, v in reference.items())


def test_quantized_models_are_not_quantized_again(tmp_path: Path) -> None:
    model = _cnn(0)
    plan = BitPlan.from_bits({"conv": 4})
    applied = apply(model, plan)
    with pytest.raises(ValueError, match="already has a bit plan"):
        apply(applied, plan)
    with pytest.raises(ValueError, match="different bit plan"):
        pack(applied, BitPlan.from_bits({"conv": 3}), tmp_path / "m.safetensors")
    with torch.no_grad():
        applied.conv.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(WeightsMismatch, match="off its quantization grid"):
        pack(applied, plan, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_packed_is_strict(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    pack(_cnn(0), BitPlan.from_bits({"conv": 4, "head": 8}), path)

    wider = _cnn(1)
    wider.extra = nn.Linear(2, 2)
    with pytest.raises(WeightsMismatch, match="extra"):
        load_packed(path, wider)

    narrower = _cnn(1)
    narrower.head = nn.Linear(16, 5)
    with pytest.raises(WeightsMismatch, match="head"):
        load_packed(path, narrower)

    foreign = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(WeightsMismatch, match="bitplan-packed-v1"):
        load_packed(foreign, _cnn(1))
