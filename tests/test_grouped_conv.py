"""Grouped and depthwise convolutions end to end, and the weight layers bitplan leaves in float.

The tiny CNN has every shape of convolution the CNN families use: a TF 'SAME' stem (timm's
`Conv2dSame`), a depthwise 3x3, grouped 3x3s (G = 2, 4), a pointwise 1x1 and a Linear head. Statistics and errors are compared with brute
force per group: unfolding each group's own input channels, and running the real convolution.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import CondConv2d, Conv2dSame, StdConv2d
from torch import nn
from typer.testing import CliRunner

from allocator import costs, unfold
from allocator.apply import load_packed, pack
from allocator.errors import BadSpec, UnsupportedModel
from allocator.job import JobSpec
from allocator.layers import build_layer_table
from allocator.pipeline import prepare, run
from allocator.zoo import register_source
from allocator.zoo.base import LoadedModel
from service.cli import app

IMAGE = 16
BITS = (2, 3, 4, 8)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 8, 3, stride=2, bias=False)  # TF 'SAME', bias made on apply
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.g2 = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.g4 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.pw = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.dw, self.g2, self.g4, self.pw):
            x = F.relu(conv(x))
        return self.head(x.mean((2, 3)))


class Token(nn.Module):
    """A custom op: tokens times a weight matrix held outside any nn.Linear."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels) / channels**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Unsupported(nn.Module):
    """Quantizable layers around ones bitplan has no rule for: Conv1d, MultiheadAttention,
    timm's CondConv2d and StdConv2d (which standardises its weight in forward), a custom op."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.std = StdConv2d(8, 8, 3, padding=1)
        self.cond = CondConv2d(8, 8, 3, padding=1, num_experts=2)
        self.route = nn.Linear(8, 2)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.token = Token(8)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.std(F.relu(self.stem(x))))
        x = self.cond(x, torch.sigmoid(self.route(x.mean((2, 3)))))
        tokens = self.conv1d(x.flatten(2)).transpose(1, 2)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        tokens = F.relu(self.mlp(self.token(tokens)))
        return self.head(tokens.mean(1))


class Conv1dOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1d(x.flatten(2)).mean(2)


class WrongInputSize(nn.Module):
    """A head built for another input size: its forward cannot run on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


MODELS = {
    "tiny": TinyCNN,
    "unsupported": Unsupported,
    "conv1d-only": Conv1dOnly,
    "wrong-input-size": WrongInputSize,
}
TIMM_IMAGE = 64
RESIDUAL = {"zero_init_last": False}
"""ResNet-style blocks start as identities otherwise: every sensitivity would be zero."""
TIMM_FAMILIES: dict[str, tuple[str, dict[str, bool]]] = {
    "mobilenetv3_small_050": ("depthwise-conv2d", {}),
    "tf_efficientnet_lite0": ("depthwise-conv2d", {}),
    "convnext_atto": ("depthwise-conv2d", {}),
    "regnetx_002": ("grouped-conv2d", RESIDUAL),
    "resnext26ts": ("grouped-conv2d", RESIDUAL),
}
"""Small members of the families built on depthwise or grouped convolutions, with the layer
kind each must show."""


def loaded(module: nn.Module, ref: str, image_size: int = IMAGE) -> LoadedModel:
    return LoadedModel(
        ref=ref,
        module=module.eval(),
        task="classification",
        input_kind="image",
        image_size=image_size,
        num_classes=10,
    )


@register_source("gconv")
def gconv_source(name: str, _weights: Path | None) -> LoadedModel:
    torch.manual_seed(0)
    return loaded(MODELS[name](), f"gconv:{name}")


@register_source("gtimm")
def gtimm_source(name: str, _weights: Path | None) -> LoadedModel:
    """timm CNNs at a small input size (their constructors take no `img_size`)."""
    torch.manual_seed(0)
    options = TIMM_FAMILIES[name][1]
    module = timm.create_model(name, pretrained=False, num_classes=10, **options)
    return loaded(module, f"gtimm:{name}", TIMM_IMAGE)


def images(path: Path, count: int, size: int = IMAGE) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
        labels=rng.integers(0, 10, count),
    )
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images(tmp_path_factory.mktemp("data") / "calib.npz", 32)


def tiny_spec(calib: Path, **options) -> JobSpec:
    values = {
        "model": "gconv:tiny",
        "calib": str(calib),
        "method": "fisher",
        "bits": BITS,
        "calib_samples": 16,
        "batch_size": 8,
        "budget": "avg-bits=3",
        "report_widths": False,
        **options,
    }
    return JobSpec(**values)


def layer_inputs(model: LoadedModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each weight layer's input on `x`."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        child.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, args[0]))
        for name, child in model.module.named_children()
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.fixture(scope="module")
def tiny() -> tuple[LoadedModel, torch.Tensor]:
    torch.manual_seed(0)
    return loaded(TinyCNN(), "gconv:tiny"), torch.randn(4, 3, IMAGE, IMAGE)


def test_input_statistics_per_group_equal_a_brute_force_per_group(tiny) -> None:
    model, x = tiny
    table = build_layer_table(model, x[:1], pin_first_last=False)
    stats = costs.input_stats(model, [x], table)  # 4 x 8 x 8 positions: none left out
    inputs = layer_inputs(model, x)
    for name in ("dw", "g2", "g4", "pw"):
        layer = getattr(model.module, name)
        width = layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        assert stats.second_moment[name].shape == (layer.groups, width, width)
        for g in range(layer.groups):
            channels = layer.in_channels // layer.groups
            part = inputs[name][:, g * channels : (g + 1) * channels]
            cols = F.unfold(part, layer.kernel_size, padding=layer.padding, stride=layer.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            torch.testing.assert_close(stats.second_moment[name][g], rows.T @ rows / len(rows))
            torch.testing.assert_close(stats.mean[name][g], rows.mean(0))
    assert stats.second_moment["dw"].shape == (8, 9, 9)  # one 9x9 moment per channel


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(8, 8, (3, 5), padding=(1, 2), dilation=(2, 1), groups=8),
        nn.Conv2d(8, 16, (1, 3), stride=(1, 2), padding=(0, 1), groups=4),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", groups=2),
        nn.Conv2d(8, 8, 3, padding=2, padding_mode="circular", dilation=2),
        nn.Conv2d(8, 8, 4, padding="same", groups=8),
        Conv2dSame(8, 8, 3, stride=2, groups=8),
        Conv2dSame(8, 4, 4, stride=2, groups=2),
    ],
    ids=[
        "nonsquare-dilated-dw",
        "strip-g4",
        "reflect-g2",
        "circular",
        "same-even",
        "tf-same-dw",
        "tf-same-g2",
    ],
)
def test_rows_times_each_groups_weights_give_the_layers_output(layer: nn.Conv2d) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 10)
    with torch.no_grad():
        out = layer(x)
    padding = unfold.match_padding(layer, x, out)
    assert padding == ("tf-same" if isinstance(layer, Conv2dSame) else "conv2d")
    rows = unfold.rows(layer, x, padding)  # every position
    weight = unfold.grouped_weight(layer.weight.detach(), layer.groups)
    product = torch.einsum("rgd,gcd->rgc", rows, weight).reshape(len(rows), -1) + layer.bias
    expected = out.permute(0, 2, 3, 1).reshape(-1, layer.out_channels)
    torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-5)


def real_output_error(layer: nn.Conv2d, x: torch.Tensor, choice: costs.QuantChoice) -> float:
    """||conv(x, dW) + correction||^2 summed over channels, mean over positions."""
    delta = F.conv2d(x, choice.weight_error, None, layer.stride, layer.padding, 1, layer.groups)
    if choice.bias_correction is not None:
        delta = delta + choice.bias_correction.view(1, -1, 1, 1)
    return float(delta.pow(2).sum() / (delta.numel() / delta.shape[1]))


def test_gptq_on_grouped_layers_lowers_the_real_output_error_and_errors_match_brute_force(
    tiny,
) -> None:
    model, x = tiny
    table = build_layer_table(model, x[:1], pin_first_last=False)
    stats = costs.input_stats(model, [x], table)
    inputs = layer_inputs(model, x)
    by_rounding = {
        rounding: costs.quant_choices(
            model, table, stats, (3,), clips=("max",), roundings=(rounding,)
        )
        for rounding in costs.ROUNDINGS
    }
    for name in ("dw", "g2", "g4"):
        layer = getattr(model.module, name)
        errors = {}
        for rounding, choices in by_rounding.items():
            choice = choices[(name, 3)]
            errors[rounding] = real_output_error(layer, inputs[name], choice)
            # The statistics' per-channel error is the real one, channel by channel.
            delta = F.conv2d(inputs[name], choice.weight_error, None, 1, 1, 1, layer.groups)
            shift = delta.mean((0, 2, 3))
            torch.testing.assert_close(choice.bias_correction, -shift, rtol=1e-4, atol=1e-6)
            centred = (delta - shift.view(1, -1, 1, 1)).pow(2).mean((0, 2, 3))
            torch.testing.assert_close(choice.channel_error, centred, rtol=1e-3, atol=1e-7)
        assert errors["gptq"] < errors["nearest"], name


def test_a_depthwise_layer_costs_more_per_parameter_than_the_pointwise_one(tiny) -> None:
    """Depthwise channels have 9 weights each: little for a per-channel grid, and nothing for
    error feedback to spread rounding over. Per parameter saved, the cost table must price the
    depthwise layer well above the pointwise one at low widths."""
    model, x = tiny
    table = build_layer_table(model, x[:1], pin_first_last=False)
    stats = costs.input_stats(model, [x], table)
    choices = costs.quant_choices(model, table, stats, (2, 3))
    params = {layer.name: layer.params for layer in table}
    assert table.get("dw").kind == "depthwise-conv2d"
    assert table.get("g2").kind == table.get("g4").kind == "grouped-conv2d"
    for b in (2, 3):
        dw, pw = choices[("dw", b)].output_error, choices[("pw", b)].output_error
        assert dw > pw, (b, dw, pw)
        assert dw / params["dw"] > 3 * pw / params["pw"], (b, dw, pw)


@pytest.mark.slow
def test_a_job_on_the_tiny_cnn_ends_with_a_plan_and_a_report(calib: Path, tmp_path: Path) -> None:
    result = run(tiny_spec(calib), workdir=tmp_path)
    assert set(result.plan.layers) == {"stem", "dw", "g2", "g4", "pw", "head"}
    kinds = {entry["layer"]: entry["kind"] for entry in result.allocation}
    assert kinds["dw"] == "depthwise-conv2d" and kinds["g4"] == "grouped-conv2d"
    assert result.metrics.float_layers == ()
    assert len(result.plan.layers["dw"].bias_correction) == 8
    table = build_layer_table(gconv_source("tiny", None), torch.randn(1, 3, IMAGE, IMAGE))
    assert table.get("stem").padding == "tf-same"
    page = Path(result.artifacts["report"]).read_text()
    assert "depthwise-conv2d" in page and "Layers left in float" not in page


def test_pack_and_load_packed_reproduce_the_quantized_grouped_model_exactly(
    calib: Path, tmp_path: Path
) -> None:
    bench = prepare(tiny_spec(calib))
    widths = {"stem": 8, "dw": 2, "g2": 3, "g4": 4, "pw": 3, "head": 8}
    plan = bench.plan(widths, {})
    assert plan.layers["dw"].rounding in costs.ROUNDINGS
    mixed = bench.quantize(plan)
    path = tmp_path / "model.safetensors"
    pack(mixed, plan, path)
    rebuilt, read_plan = load_packed(path, TinyCNN())
    assert read_plan == plan
    for key, value in mixed.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    x = torch.randn(4, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), mixed(x))


@pytest.mark.slow
def test_layers_without_a_rule_stay_float_listed_with_their_reason(
    calib: Path, tmp_path: Path
) -> None:
    result = run(tiny_spec(calib, model="gconv:unsupported"), workdir=tmp_path)
    floating = {layer.name: layer for layer in result.metrics.float_layers}
    assert set(floating) == {"std", "cond", "conv1d", "attn", "attn.out_proj", "token"}
    assert set(result.plan.layers) == {"stem", "route", "mlp", "head"}
    assert "transforms the weight" in floating["std"].reason
    assert floating["conv1d"].type == "Conv1d" and "nn.Conv2d only" in floating["conv1d"].reason
    assert "in_proj_weight" in floating["attn"].reason
    assert floating["attn"].params == 3 * 8 * 8
    assert "never called" in floating["attn.out_proj"].reason
    assert "CondConv2d is not nn.Linear or nn.Conv2d" in floating["cond"].reason
    assert floating["token"].type == "Token"
    assert json.loads(json.dumps(result.to_json()))["metrics"]["float_layers"]
    page = Path(result.artifacts["report"]).read_text()
    assert "Layers left in float" in page and "in_proj_weight" in page


def test_a_model_with_nothing_to_quantize_fails_in_one_line(
    calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UnsupportedModel, match="conv1d \\(Conv1d\\)"):
        run(tiny_spec(calib, model="gconv:conv1d-only"))
    monkeypatch.setenv("BITPLAN_HOME", str(tmp_path / "home"))
    args = ["run", "--model", "gconv:conv1d-only", "--calib", str(calib), "--method", "fisher"]
    outcome = CliRunner().invoke(app, [*args, "--calib-samples", "8"])
    assert outcome.exit_code == 2
    assert "no layer bitplan can quantize" in outcome.stderr
    assert "Traceback" not in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1


def test_a_model_that_cannot_run_on_its_data_fails_in_one_line(calib: Path) -> None:
    with pytest.raises(UnsupportedModel, match=r"shape \(1, 3, 16, 16\): mat1 and mat2") as info:
        run(tiny_spec(calib, model="gconv:wrong-input-size"))
    assert "\n" not in str(info.value)


def test_pinning_a_float_layer_says_why_it_cannot_be(tiny) -> None:
    torch.manual_seed(0)
    model = loaded(Unsupported(), "gconv:unsupported")
    with pytest.raises(BadSpec, match="conv1d stays float"):
        build_layer_table(model, torch.randn(1, 3, IMAGE, IMAGE), pins={"conv1d": 8})


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TIMM_FAMILIES))
def test_timm_cnn_families_run_end_to_end(name: str, tmp_path: Path) -> None:
    data = images(tmp_path / "calib.npz", 16, TIMM_IMAGE)
    spec = JobSpec(
        model=f"gtimm:{name}",
        calib=str(data),
        method="fisher",
        bits=BITS,
        calib_samples=8,
        batch_size=8,
        budget="avg-bits=4",
        report_widths=False,
        report=False,
    )
    result = run(spec)
    kinds = [entry["kind"] for entry in result.allocation]
    assert TIMM_FAMILIES[name][0] in kinds
    assert result.metrics.float_layers == ()
    assert len(result.plan.layers) == len(kinds)
    assert {entry.weight_bits for entry in result.plan.layers.values()} <= set(BITS)
    assert math.isfinite(result.metrics.quantized["kl"])
    if name.startswith("tf_"):
        model = gtimm_source(name, None)
        table = build_layer_table(model, torch.randn(1, 3, TIMM_IMAGE, TIMM_IMAGE))
        assert any(layer.padding == "tf-same" for layer in table)
