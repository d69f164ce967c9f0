"""The CI subset of the coverage matrix (`bench/coverage.py --tiny`): a whole small job on one
family of each kind (plain CNN, depthwise CNN, Conv2dSame CNN, hierarchical CNN, ViT, windowed
ViT), every step green. The full matrix, at native resolution, is the benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.coverage import FAMILIES, STEPS, cover

CI_FAMILIES = (
    "resnet",
    "mobilenetv3",
    "efficientnet-lite (Conv2dSame)",
    "convnext",
    "vit",
    "swin",
    "hf bert",
    "hf vit",
    "hf gpt2",
    "hf llama",
)


@pytest.mark.slow
@pytest.mark.parametrize("name", CI_FAMILIES)
def test_every_step_of_a_small_job_runs(name: str, tmp_path: Path) -> None:
    row = cover(FAMILIES[name], tiny=True, folder=tmp_path, images=2)
    assert row.steps == dict.fromkeys(STEPS, "ok"), row.steps
    assert row.layers and row.quantized_share and row.quantized_share > 0.01
    assert row.float_layers == 0
