"""`timm:<name>[?key=value&...]`: any timm architecture, with weights only from the user.

timm covers most image models people quantize, and its `pretrained_cfg` already knows the input
size and normalisation each one expects, so this source reads them from there instead of asking.
Nothing is downloaded (`pretrained=False`): weights come from `--weights`, loaded safely.
Options after `?` become `create_model` keyword arguments, e.g. `num_classes=10`.

Never imports transformers.
"""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from allocator.errors import UnknownModel
from allocator.zoo import close_matches, register_source
from allocator.zoo.base import LoadedModel
from allocator.zoo.weights import load_weights_file

OptionValue = bool | int | float | str | tuple["OptionValue", ...] | None


@register_source("timm")
def timm_source(name: str, weights: Path | None) -> LoadedModel:
    architecture, _, query = name.partition("?")
    ref = f"timm:{name}"
    options = parse_options(query, ref)
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
        image_size=_image_size(options.get("img_size"), cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        num_classes=num_classes or None,
    )


def _image_size(option: OptionValue, configured: int) -> int:
    if isinstance(option, int) and not isinstance(option, bool):
        return option
    return configured


def parse_options(query: str, ref: str) -> dict[str, OptionValue]:
    """`a=1&b=false&c=x&d=2,2` -> {"a": 1, "b": False, "c": "x", "d": (2, 2)}: typed, since
    timm checks types."""
    options: dict[str, OptionValue] = {}
    for item in filter(None, query.split("&")):
        key, equals, value = item.partition("=")
        if not key or not equals:
            raise UnknownModel(
                f"cannot read the option {item!r} in {ref!r}; write options as ?key=value&key=value"
            )
        options[key] = _parse_value(value)
    return options


def _parse_value(text: str) -> OptionValue:
    if "," in text:  # Swin's depths=2,2,6,2 and num_heads=3,6,12,24 are tuples
        return tuple(_parse_value(part) for part in text.split(","))
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def _create(architecture: str, options: dict[str, OptionValue], ref: str) -> nn.Module:
    # A name with a pretrained tag ("resnet18.a1_in1k") carries that tag's input config.
    tagged = "." in architecture
    known = timm.is_model(architecture) and (not tagged or architecture in timm.list_pretrained())
    if not known:
        candidates = timm.list_pretrained() if tagged else timm.list_models()
        raise UnknownModel(
            f"timm has no model {architecture!r}{close_matches(architecture, candidates)}; "
            "see timm.list_models()"
        )
    try:
        return timm.create_model(architecture, pretrained=False, **options)
    except TypeError as exc:  # an option the architecture does not take
        raise UnknownModel(f"{ref}: {exc}; remove or rename that option") from None
