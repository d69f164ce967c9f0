"""Activation sites of the timm families whose layers do not read NCHW convolutions and
channels-last tokens only: ConvNeXt (NHWC LayerNorm + Linear MLP, NCHW depthwise conv), Swin
(NHWC patch merging), PoolFormer (NCHW LayerNorm2d before a downsampling conv) and MobileViT
(LayerNorm output folded back into NCHW for a 1x1 conv).

A per-channel quantizer must learn its ranges along the consuming layer's channels and apply
them along the same dimension; a 4D tensor's rank says nothing about which one that is.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.metaformer import GroupNorm1NoBias, MetaFormer
from torch import nn

from allocator.activation_bench import CANDIDATES, ActivationBench, quantizers
from allocator.activations import Site, instrument, quantized_activations
from allocator.layers import build_layer_table
from allocator.quant.activation import calibrate
from allocator.zoo import load_model
from allocator.zoo.base import LoadedModel

SIZE = 32
CONVNEXT = f"timm:test_convnext?num_classes=10&input_size={SIZE}"
SWIN = (
    f"timm:swin_tiny_patch4_window7_224?img_size={SIZE}&patch_size=2&window_size=4&embed_dim=16"
    "&depths=2,1&num_heads=1,2&num_classes=10"
)
MOBILEVIT = f"timm:mobilevit_xxs?num_classes=10&input_size={SIZE}"
FAMILIES = ("convnext", "swin", "poolformer", "mobilevit")
LAYOUT_SITES = {
    "convnext": {"stages.0.blocks.0.conv_dw": 1, "stages.0.blocks.0.mlp.fc1": -1},
    "swin": {"layers.1.downsample.reduction": -1, "layers.0.blocks.0.mlp.fc1": -1},
    "poolformer": {"stages.1.downsample.conv": 1},
    "mobilevit": {"stages.2.1.conv_proj.conv": 1, "stages.2.1.transformer.0.mlp.fc1": -1},
}
"""Per family, post-LayerNorm sites and the dimension their consumer reads channels from; each
family has at least one 4D input that a layout read from the tensor's rank gets wrong."""
Family = tuple[str, LoadedModel, torch.Tensor, ActivationBench]
"""A family's name, tiny model, calibration images and activation sites with their samples."""


def tiny_poolformer() -> LoadedModel:
    """poolformerv2_s12's blocks at one block per stage and narrow widths: its factory fixes
    depths and dims, so the timm source cannot shrink it."""
    module = MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(8, 16, 24, 32),
        norm_layers=GroupNorm1NoBias,
        use_mlp_head=False,
        num_classes=10,
    )
    return LoadedModel("poolformerv2 tiny", module.eval(), "classification", "image", SIZE)


def build(family: str) -> LoadedModel:
    torch.manual_seed(0)
    if family == "poolformer":
        return tiny_poolformer()
    return load_model({"convnext": CONVNEXT, "swin": SWIN, "mobilevit": MOBILEVIT}[family])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> Family:
    model = build(request.param)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    table = build_layer_table(model, images[:1])
    return request.param, model, images, ActivationBench(model, [images], table)


def site_inputs(
    model: LoadedModel, images: torch.Tensor, sites: list[Site]
) -> dict[str, torch.Tensor]:
    """The tensors the sites' layers receive, as they are (not as calibration rows)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> torch.Tensor:
        seen[name] = x
        return x

    with torch.no_grad(), instrument(model.module, sites, keep):
        model(images)
    return seen


def in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def test_each_site_takes_its_channel_axis_from_the_consuming_layer(family: Family) -> None:
    name, model, _images, acts = family
    modules = dict(model.module.named_modules())
    sites = {site.name: site for site in acts.sites}
    for site_name, axis in LAYOUT_SITES[name].items():
        assert sites[site_name].role == "post-ln"
        assert sites[site_name].channel_axis == axis
    for site in acts.sites:
        if site.layer is None:
            continue
        layer = modules[site.layer]
        assert site.channel_axis == (1 if isinstance(layer, nn.Conv2d) else -1)
        assert acts.samples[site.name].shape[1] == in_channels(layer)


def test_per_channel_ranges_are_the_channels_the_layer_reads(family: Family) -> None:
    """Calibrated on the sampled rows, applied to the real tensor: the ranges are each consumer
    channel's min and max, and quantizing the tensor equals quantizing its rows."""
    name, model, images, acts = family
    sites = {site.name: site for site in acts.sites}
    tensors = site_inputs(model, images, [sites[site_name] for site_name in LAYOUT_SITES[name]])
    for site_name, x in tensors.items():
        site = sites[site_name]
        quantizer = calibrate("channel", acts.samples[site_name], 8, site.channel_axis)
        channels_last = x.movedim(site.channel_axis, -1)
        rows = channels_last.reshape(-1, channels_last.shape[-1])
        assert rows.shape[0] == acts.samples[site_name].shape[0]  # every row kept: exact ranges
        torch.testing.assert_close(quantizer.lo, rows.amin(0))
        torch.testing.assert_close(quantizer.hi, torch.maximum(rows.amax(0), rows.amin(0) + 1e-8))
        quantized = quantizer(x).movedim(site.channel_axis, -1).reshape(rows.shape)
        torch.testing.assert_close(quantized, quantizer(rows))
        step = (quantizer.hi - quantizer.lo) / 255
        assert ((quantized - rows).abs() <= step / 2 + 1e-6).all()


def test_every_site_at_8_bits_runs_and_stays_close_to_fp32(family: Family) -> None:
    """`repq` gives every post-LayerNorm site, conv inputs included, a per-channel quantizer."""
    _name, model, images, acts = family
    chosen = quantizers(acts.assign(8, "repq"))
    assert any(q.kind == "channel" for q in chosen.values())
    with torch.no_grad():
        reference = model(images)
        with quantized_activations(model.module, acts.sites, chosen):
            out = model(images)
    assert torch.isfinite(out).all()
    assert float((out - reference).norm() / reference.norm()) < 0.1


def test_candidates_are_ranked_on_the_consumers_output(family: Family) -> None:
    """`auto` ranks a site's candidates by the error at its layer's output, the sampled rows
    times the layer's weight: rows in any other channels cannot be multiplied by it."""
    name, _model, _images, acts = family
    sites = {site.name: site for site in acts.sites}
    for site_name in LAYOUT_SITES[name]:
        for kind in CANDIDATES["post-ln"]:
            assert 0 <= acts.error(sites[site_name], kind, 8) < 0.01


def test_a_per_channel_quantizer_refuses_a_tensor_with_other_channels() -> None:
    """Broadcasting ranges along the wrong dimension fails far from the cause, or not at all
    when the counts agree by chance: the quantizer says which shape it was given instead."""
    rows = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    quantizer = calibrate("channel", rows, 8, axis=1)
    nchw = rows.reshape(4, 4, 4, 6).permute(0, 3, 1, 2)
    assert quantizer(nchw).shape == nchw.shape
    with pytest.raises(ValueError, match=r"6 channels along dimension 1.*\(4, 4, 4, 6\)"):
        quantizer(nchw.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="6 channels along dimension -1"):
        calibrate("channel", rows, 8)(nchw)
