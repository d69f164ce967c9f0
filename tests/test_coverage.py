"""The CI subset of the coverage matrix (`bench/coverage.py --tiny`): every step of a small job on
one family of each kind (plain CNN, grouped CNN, depthwise CNN with squeeze-excitation gates and
fused BatchNorm+activation, channels-last ConvNeXt with LayerNorm2d, ViT, Hugging Face encoders and
causal LMs). The whole matrix is the benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.coverage import FAMILIES, STEPS, cover

CI_FAMILIES = (
    "resnet",
    "regnet",
    "efficientnet",
    "convnext",
    "vit",
    "hf bert",
    "hf vit",
    "hf gpt2",
    "hf llama",
)
"""Families green on every step in bench/coverage.py --tiny, one per kind of layer and block the
others are built from."""


@pytest.mark.slow
@pytest.mark.parametrize("name", CI_FAMILIES)
def test_every_step_of_a_small_job_runs(name: str, tmp_path: Path) -> None:
    row = cover(FAMILIES[name], tiny=True, folder=tmp_path, images=2)
    assert row.steps == dict.fromkeys(STEPS, "ok"), row.steps
    assert row.layers and row.quantized_share and row.quantized_share > 0.01
    assert row.float_layers == 0
