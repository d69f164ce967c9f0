"""`timm:<name>[?key=value&...]`: any timm architecture, with weights only from the user.

timm covers most image models people quantize, and its `pretrained_cfg` already knows the input
size and normalisation each one expects, so this source reads them from there instead of asking.
Nothing is downloaded (`pretrained=False`): weights come from `--weights`, loaded safely.
Options after `?` become `create_model` keyword arguments, e.g. `num_classes=10`, but only those
in `TIMM_OPTIONS`: the ones that change an architecture's shape or regularisation, each bounded.
Every other keyword of `create_model` (`checkpoint_path`, `pretrained_cfg_overlay`, `cache_dir`,
...) can open files or reach a hub, and is refused.

Never imports transformers.
"""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from allocator.errors import UnknownModel
from allocator.zoo import close_matches, register_source
from allocator.zoo.base import LoadedModel
from allocator.zoo.options import Option, Options, OptionValue, parse_options
from allocator.zoo.weights import first_line, load_weights_file

INPUT_SIZE = "input_size"
FRACTION = Option("float", 0.0, 1.0)
FLAG = Option("bool")
TIMM_OPTIONS: Options = {
    "num_classes": Option("int", 0, 100_000),
    "img_size": Option("int", 8, 1024, tuple_ok=True),
    "in_chans": Option("int", 1, 64),
    "patch_size": Option("int", 1, 64, tuple_ok=True),
    "window_size": Option("int", 1, 64, tuple_ok=True),
    "embed_dim": Option("int", 1, 4096, tuple_ok=True),
    "embed_dims": Option("int", 1, 4096, tuple_ok=True),
    "depth": Option("int", 1, 64),
    "depths": Option("int", 0, 64, tuple_ok=True),
    "num_heads": Option("int", 1, 64, tuple_ok=True),
    "mlp_ratio": Option("float", 0.25, 16.0),
    "reg_tokens": Option("int", 0, 16),
    "output_stride": Option("int", 8, 32),
    "channel_multiplier": Option("float", 0.1, 4.0),
    "depth_multiplier": Option("float", 0.1, 4.0),
    "global_pool": Option(
        "word", words=("avg", "max", "avgmax", "catavgmax", "token", "map", "fast", "avgmaxc")
    ),
    "drop_rate": FRACTION,
    "drop_path_rate": FRACTION,
    "attn_drop_rate": FRACTION,
    "proj_drop_rate": FRACTION,
    "pos_drop_rate": FRACTION,
    "class_token": FLAG,
    "qkv_bias": FLAG,
    "zero_init_last": FLAG,
    INPUT_SIZE: Option("int", 8, 1024),
}
"""The `create_model` keywords a reference may set, with their bounds: enough to shrink any
architecture for a test or fit a head to a dataset, none that opens a file. `input_size` is
bitplan's own: the resolution images are resized to for a convolutional model, which takes any
(a transformer's is `img_size`, which rebuilds its position embedding)."""


def check_timm_ref(name: str) -> None:
    architecture, _, query = name.partition("?")
    parse_options(query, f"timm:{name}", TIMM_OPTIONS)
    _check_architecture(architecture)


@register_source("timm", check=check_timm_ref, meta=True)
def timm_source(name: str, weights: Path | None) -> LoadedModel:
    architecture, _, query = name.partition("?")
    ref = f"timm:{name}"
    options = parse_options(query, ref, TIMM_OPTIONS)
    input_size = options.pop(INPUT_SIZE, None)
    module = _create(architecture, options, ref)
    if weights is not None:
        load_weights_file(module, weights, ref)
    cfg = module.pretrained_cfg
    num_classes = module.num_classes
    return LoadedModel(
        ref=ref,
        module=module,
        task="classification" if num_classes else "embedding",
        input_kind="image",
        # `img_size=` rebuilds the model for another input size; pretrained_cfg keeps the old one.
        image_size=_image_size(input_size or options.get("img_size"), cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        num_classes=num_classes or None,
    )


def _image_size(option: OptionValue, configured: int) -> int:
    if isinstance(option, int) and not isinstance(option, bool):
        return option
    return configured


def _check_architecture(architecture: str) -> None:
    # A name with a pretrained tag ("resnet18.a1_in1k") carries that tag's input config.
    tagged = "." in architecture
    known = timm.is_model(architecture) and (not tagged or architecture in timm.list_pretrained())
    if not known:
        candidates = timm.list_pretrained() if tagged else timm.list_models()
        raise UnknownModel(
            f"timm has no model {architecture!r}{close_matches(architecture, candidates)}; "
            "see timm.list_models()"
        )


def _create(architecture: str, options: dict[str, OptionValue], ref: str) -> nn.Module:
    _check_architecture(architecture)
    try:
        return timm.create_model(architecture, pretrained=False, **options)
    except TypeError as exc:  # an option the architecture does not take
        raise UnknownModel(f"{ref}: {first_line(exc)}; remove or rename that option") from None
    except (ValueError, AssertionError, RuntimeError) as exc:  # options that do not fit together
        raise UnknownModel(
            f"{ref}: timm cannot build it with these options ({first_line(exc)}); change them"
        ) from None
