"""Activation quantizers on synthetic distributions, the RepQ-ViT fold, and activation sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from allocator.activation_bench import CANDIDATES, PER_SITE, ActivationBench
from allocator.activations import collect, find_sites, quantized_activations
from allocator.budget import parse_budget
from allocator.errors import BadBudget, UnknownMethod
from allocator.job import JobSpec
from allocator.layers import LayerTable, build_layer_table
from allocator.pipeline import run
from allocator.quant.activation import ActQuantizer, calibrate, logsqrt2_by_shifts
from allocator.quant.reparam import fold
from allocator.weight_rules import fp32_outputs
from allocator.zoo import load_model


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def outlier_channels(rows: int = 4096, channels: int = 32, seed: int = 0) -> torch.Tensor:
    """Post-LayerNorm-like activations: most channels narrow, a few 50x wider and offset."""
    generator = torch.Generator().manual_seed(seed)
    width = torch.ones(channels)
    width[:3] = 50.0
    offset = torch.zeros(channels)
    offset[:3] = 20.0
    return torch.randn(rows, channels, generator=generator) * width + offset


def power_law(count: int = 1 << 16, seed: int = 0) -> torch.Tensor:
    """Softmax rows over 64 keys with peaked logits: most probabilities tiny, a few near 1."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count // 64, 64, generator=generator) * 4
    return logits.softmax(-1)


@pytest.mark.parametrize("kind", ["minmax", "percentile", "mse"])
def test_uniform_rules_stay_on_a_grid_of_2_pow_bits_levels(kind: str) -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    quantizer = calibrate(kind, x, 4)
    assert len(torch.unique(quantizer(x))) <= 16
    assert quantizer.lo <= 0 <= quantizer.hi
    assert mse(quantizer(x), x) < mse(torch.zeros_like(x), x) / 20


def test_more_bits_less_error_and_16_is_exact() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2))
    errors = [mse(calibrate("mse", x, bits)(x), x) for bits in (4, 6, 8)]
    assert errors[0] > errors[1] > errors[2]
    assert torch.equal(calibrate("mse", x, 16)(x), x)


def test_mse_and_percentile_beat_minmax_on_heavy_tails() -> None:
    torch.manual_seed(0)  # the draw, not the test order, decides how far the tail reaches
    x = torch.distributions.StudentT(2.0).sample((20_000,))
    minmax = mse(calibrate("minmax", x, 4)(x), x)
    assert mse(calibrate("mse", x, 4)(x), x) < minmax
    assert mse(calibrate("percentile", x, 4)(x), x) < minmax


def test_channel_quantizer_fixes_outlier_channels() -> None:
    x = outlier_channels()
    narrow = slice(3, None)
    per_tensor = calibrate("minmax", x, 6)(x)
    per_channel = calibrate("channel", x, 6)(x)
    assert (
        mse(per_channel[:, narrow], x[:, narrow]) < mse(per_tensor[:, narrow], x[:, narrow]) / 100
    )


def test_clipped_channel_ranges_are_narrower() -> None:
    x = outlier_channels()
    full, clipped = calibrate("channel", x, 4), calibrate("channel-clip", x, 4)
    assert ((clipped.hi - clipped.lo) < (full.hi - full.lo)).all()


@pytest.mark.parametrize("kind", ["log2", "logsqrt2", "sulq"])
def test_softmax_quantizers_beat_uniform_on_power_law_at_4_bits(kind: str) -> None:
    p = power_law()
    uniform = calibrate("minmax", p, 4)(p)
    quantized = calibrate(kind, p, 4)(p)
    small = p < 0.05
    assert mse(quantized[small], p[small]) < mse(uniform[small], p[small])
    assert (quantized >= 0).all() and (quantized <= 1).all()


def test_logsqrt2_reparameterized_to_shifts_is_identical() -> None:
    p = power_law()
    for bits in (4, 6, 8):
        assert torch.equal(calibrate("logsqrt2", p, bits)(p), logsqrt2_by_shifts(p, bits))


def test_logsqrt2_has_finer_steps_than_log2() -> None:
    p = power_law()
    assert mse(calibrate("logsqrt2", p, 6)(p), p) < mse(calibrate("log2", p, 6)(p), p)


def test_tanq_keeps_strong_attention_that_log2_rounds_to_a_half() -> None:
    """TanQ's reason to exist: values near 1 (a token attending mostly to one other) get
    levels of their own, where log2's nearest are 1 and 1/2."""
    strong = torch.tensor([0.7, 0.75, 0.8, 0.85, 0.9])
    p = torch.cat([power_law().flatten(), strong])
    log2, tanq = calibrate("log2", p, 4), calibrate("tanq", p, 4)
    assert mse(tanq(strong), strong) < mse(log2(strong), strong) / 4
    assert tanq(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.0, 1.0], abs=1e-3)
    assert len(torch.unique(tanq(torch.linspace(0, 1, 10001)))) <= 16


def test_unknown_kind_names_the_choices() -> None:
    with pytest.raises(UnknownMethod, match="logsqrt2"):
        calibrate("tanh", torch.zeros(4), 4)


@pytest.mark.parametrize("target", ["mean", "median"])
@pytest.mark.parametrize("kind", ["channel", "channel-clip"])
def test_fold_keeps_the_function_and_matches_per_channel_quantization(
    target: str, kind: str
) -> None:
    torch.manual_seed(0)
    channels = 16
    norm = nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels) * 5 + 0.1)
        norm.weight[:2] *= 30
        norm.bias.copy_(torch.randn(channels) * 3)
    consumers = [nn.Linear(channels, 8), nn.Linear(channels, 12, bias=False)]
    x = torch.randn(512, channels) * 3 + 1
    with torch.no_grad():
        before = [layer(norm(x)) for layer in consumers]
        channel = calibrate(kind, norm(x), 6)
        quantized_before = [layer(channel(norm(x))) for layer in consumers]
        per_tensor = fold(norm, consumers, channel, target)
        after = [layer(norm(x)) for layer in consumers]
        quantized_after = [layer(per_tensor(norm(x))) for layer in consumers]
    assert per_tensor.lo.dim() == 0
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    for a, b in zip(quantized_before, quantized_after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def vit() -> tuple:
    torch.manual_seed(0)
    model = load_model(
        "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&embed_dim=48&depth=2&num_heads=3"
        "&num_classes=10"
    )
    images = torch.randn(4, 3, 32, 32)
    return model, images, build_layer_table(model, images[:1])


def test_sites_of_a_vit_have_the_roles_of_the_papers() -> None:
    model, images, table = vit()
    sites = {site.name: site for site in find_sites(model, images, table)}
    assert sites["patch_embed.proj"].role == "input"
    for block in ("blocks.0", "blocks.1"):
        assert sites[f"{block}.attn.qkv"].role == "post-ln"
        assert sites[f"{block}.mlp.fc1"].role == "post-ln"
        assert sites[f"{block}.mlp.fc2"].role == "post-gelu"
        assert sites[f"{block}.attn.proj"].role == "other"
        assert sites[f"{block}.attn.probs"].role == "post-softmax"
        assert sites[f"{block}.attn.probs"].macs > 0
    assert sites["head"].role == "other"  # a pooled token: a slice, not the norm output itself


def test_sites_of_a_swin_see_through_window_partition_and_shift() -> None:
    """Swin rearranges the norm1 output (pad, roll, window partition) before qkv: a new tensor,
    so tensor identity alone called the qkv input "other" and left it per-tensor."""
    torch.manual_seed(0)
    model = load_model(
        "timm:swin_tiny_patch4_window7_224?img_size=32&patch_size=2&window_size=4&embed_dim=16"
        "&depths=2,1&num_heads=1,2&num_classes=10"
    )
    images = torch.randn(2, 3, 32, 32)
    table = build_layer_table(model, images[:1])
    sites = {site.name: site for site in find_sites(model, images, table)}
    for block in ("layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0"):
        assert sites[f"{block}.attn.qkv"].role == "post-ln"
        assert sites[f"{block}.mlp.fc1"].role == "post-ln"
        assert sites[f"{block}.mlp.fc2"].role == "post-gelu"
        assert sites[f"{block}.attn.proj"].role == "other"
        assert sites[f"{block}.attn.probs"].role == "post-softmax"
    assert sites["layers.1.downsample.reduction"].role == "post-ln"
    assert sites["head.fc"].role == "other"
    samples = collect(model, [images], list(sites.values()))
    assert samples["layers.0.blocks.1.attn.probs"].max() <= 1.0  # the shifted block's too


def test_quantized_activations_change_outputs_and_16_bits_do_not() -> None:
    model, images, table = vit()
    sites = find_sites(model, images, table)
    fused_before = [m.fused_attn for m in model.module.modules() if hasattr(m, "fused_attn")]
    samples = collect(model, [images], sites)
    assert set(samples) == {site.name for site in sites}
    assert samples["blocks.0.attn.probs"].max() <= 1.0
    with torch.no_grad():
        reference = model(images)
        exact = {s.name: ActQuantizer("minmax", 16) for s in sites}
        with quantized_activations(model.module, sites, exact):
            same = model(images)
        coarse = {s.name: calibrate("minmax", samples[s.name], 4) for s in sites}
        with quantized_activations(model.module, sites, coarse):
            changed = model(images)
        after = model(images)
    torch.testing.assert_close(same, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, reference, atol=1e-3)
    torch.testing.assert_close(after, reference)
    fused_after = [m.fused_attn for m in model.module.modules() if hasattr(m, "fused_attn")]
    assert fused_after == fused_before


TINY_VIT = (
    "timm:vit_tiny_patch16_224?img_size=16&patch_size=4&embed_dim=32&depth=2&num_heads=2"
    "&num_classes=10"
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("acts") / "images.npz"
    np.savez(
        path,
        images=rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8),
        labels=rng.integers(0, 10, size=24),
    )
    return str(path)


@pytest.mark.slow
def test_a_job_with_match_budget_quantizes_activations(images: str) -> None:
    spec = tiny_job(images, budget="match=W4A8", act_quantizers="repq")
    result = run(spec)
    payload = result.to_json()
    sites = {a["site"]: a for a in payload["act_allocation"]}
    assert sites["blocks.0.attn.probs"]["role"] == "post-softmax"
    assert sites["blocks.1.attn.qkv"]["act_bits"] == 8
    assert sites["head"]["act_bits"] == 8
    assert sites["blocks.0.attn.probs"]["quantizer"] == "logsqrt2"
    assert sites["blocks.0.mlp.fc1"]["quantizer"] == "channel"
    assert payload["metrics"]["uniform"]["act_bits"] == 8
    assert payload["metrics"]["uniform"]["bits"] == 4
    budget = parse_budget("match=W4A8")
    assert 0 < payload["bops"] <= budget.resolve(prepare_table(spec)).bops
    stored = result.plan.activations["blocks.0.attn.probs"]
    assert stored["quantizer"] == "logsqrt2" and stored["params"]["bits"] == 8


def tiny_job(images: str, **options: object) -> JobSpec:
    return JobSpec(model=TINY_VIT, calib=images, calib_samples=16, batch_size=8, **options)


def prepare_table(spec: JobSpec) -> LayerTable:
    model = load_model(spec.model)
    return build_layer_table(model, torch.zeros(1, 3, 16, 16))


def test_bad_activation_settings_are_refused_before_loading() -> None:
    with pytest.raises(BadBudget, match="4, 6, 8, 16"):
        JobSpec(model="x", calib="y", act_bits=5).validate()
    with pytest.raises(UnknownMethod, match="repq"):
        JobSpec(model="x", calib="y", act_bits=8, act_quantizers="magic").validate()
    with pytest.raises(BadBudget, match="match=W4A8"):
        JobSpec(model="x", calib="y", budget="match=4/8").validate()


def test_without_held_out_samples_auto_picks_each_sites_least_output_error_candidate() -> None:
    model, images, table = vit()
    acts = ActivationBench(model, [images], table)
    assert acts.role_kinds(4) == {}
    chosen = acts.assign(4, "auto")
    for assignment in chosen:
        site = assignment.site
        assert assignment.quantizer.kind in CANDIDATES[site.role]
        bits = assignment.quantizer.bits
        best = min(acts.error(site, kind, bits) for kind in CANDIDATES[site.role])
        assert acts.error(site, assignment.quantizer.kind, bits) == best
    assert {a.quantizer.bits for a in chosen if a.site.layer in ("patch_embed.proj", "head")} == {8}


def test_auto_chooses_each_roles_kind_by_held_out_divergence() -> None:
    """Greedy over roles with per-site as each role's first option: every step can only lower
    the held-out divergence, and the sites of a role that was given one kind all use it."""
    model, images, table = vit()
    holdout = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    reference = fp32_outputs(model, holdout)
    acts = ActivationBench(model, [images], table, holdout, reference)
    kinds = acts.role_kinds(4)
    measured = acts.role_divergence[4]
    roles = list(measured)
    assert roles == [role for role in CANDIDATES if role in {s.role for s in acts.sites}]
    previous = None
    for role in roles:
        options = measured[role]
        assert set(options) == {PER_SITE, *CANDIDATES[role]}
        picked = kinds.get(role, PER_SITE)
        assert options[picked] == min(options.values())
        if previous is not None:  # per-site now is the state the previous role left
            assert options[PER_SITE] == pytest.approx(previous)
        previous = options[picked]
    pinned = {"patch_embed.proj", "head"}
    for assignment in acts.assign(4, "auto"):
        site = assignment.site
        if site.role in kinds and site.layer not in pinned:
            assert assignment.quantizer.kind == kinds[site.role]
    assert acts.rules_to_dict()["4"]["chosen"] == {r: kinds.get(r, PER_SITE) for r in roles}


@pytest.mark.slow
def test_joint_allocation_chooses_activation_widths_within_the_matched_bops(images: str) -> None:
    spec = tiny_job(images, budget="match=W4A6", act_bits="auto")
    payload = run(spec).to_json()
    widths = {a["site"]: a["act_bits"] for a in payload["act_allocation"]}
    assert set(widths.values()) <= {4, 6, 8, 16}
    assert widths["blocks.0.attn.probs"] == 6  # the A of match=W4A6, as in the uniform plan
    assert payload["metrics"]["uniform"]["act_bits"] == 6
    budget = parse_budget("match=W4A6").resolve(prepare_table(spec))
    assert payload["bops"] <= budget.bops
    assert payload["weight_bytes"] * 8 <= budget.size_bits
    assert set(payload["metrics"]["act_rules"]) >= {"4", "6"}  # auto chose on held-out samples
    check = payload["metrics"]["plan_check"]  # checked against uniform W4A6, acts included
    assert check is not None and check["kept"] == min(("mixed", "uniform"), key=check.get)
