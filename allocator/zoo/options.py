"""Model-reference options as data: `timm:vit_tiny_patch16_224?img_size=32&depth=2`.

A reference is written by a tenant, and every option of it would otherwise become a keyword
argument of a constructor that can open files (`checkpoint_path`, `pretrained_cfg_overlay`,
`cache_dir`) or allocate without bound (`num_classes=1000000000`, `img_size=100000`). So a
source declares the options it accepts, each with a type and bounds, and anything else is
refused with the option's name and the list of accepted ones. No declared option may hold a
path: values are numbers, booleans, short words or tuples of numbers.

Never imports torch or a model library: the API checks references without building models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from allocator.errors import UnknownModel

OptionValue = bool | int | float | str | tuple["OptionValue", ...] | None

MAX_QUERY_LENGTH = 1024
MAX_TUPLE_LENGTH = 16
WORD = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""The only strings an option may hold (pooling names and the like): never a path or URL."""


@dataclass(frozen=True)
class Option:
    """One accepted option: `kind` int, float, bool or word; numbers within [low, high];
    `tuple_ok` also accepts a comma tuple of such numbers (Swin's `depths=2,2,6,2`);
    `words` lists the accepted words for kind "word"."""

    kind: str
    low: float = -math.inf
    high: float = math.inf
    tuple_ok: bool = False
    words: tuple[str, ...] = ()

    def check(self, name: str, value: OptionValue, ref: str) -> OptionValue:
        if isinstance(value, tuple):
            if not self.tuple_ok or len(value) > MAX_TUPLE_LENGTH:
                raise UnknownModel(f"{ref}: option {name} takes one value, not a comma list")
            return tuple(self._scalar(name, item, ref) for item in value)
        return self._scalar(name, value, ref)

    def _scalar(self, name: str, value: OptionValue, ref: str) -> OptionValue:
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise UnknownModel(f"{ref}: option {name} takes true or false, got {value!r}")
            return value
        if self.kind == "word":
            if value == "" or value is None:
                return ""
            if not isinstance(value, str) or (self.words and value not in self.words):
                raise UnknownModel(
                    f"{ref}: option {name} takes one of {', '.join(self.words)}, got {value!r}"
                )
            return value
        number_types = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_types):
            raise UnknownModel(
                f"{ref}: option {name} takes a{'n' * (self.kind == 'int')} "
                f"{self.kind}, got {value!r}"
            )
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise UnknownModel(
                f"{ref}: option {name}={value} is outside {_bound(self.low)}..{_bound(self.high)}"
            )
        return float(value) if self.kind == "float" else value


Options = Mapping[str, Option]
"""What a source accepts after `?`, by option name."""


def parse_options(query: str, ref: str, accepted: Options) -> dict[str, OptionValue]:
    """`a=1&b=false&d=2,2` -> {"a": 1, "b": False, "d": (2, 2)}, each checked against
    `accepted`: typed, since model constructors check types, and bounded."""
    if len(query) > MAX_QUERY_LENGTH:
        raise UnknownModel(f"{ref[:80]}...: options are longer than {MAX_QUERY_LENGTH} characters")
    options: dict[str, OptionValue] = {}
    for item in filter(None, query.split("&")):
        key, equals, text = item.partition("=")
        if not key or not equals:
            raise UnknownModel(
                f"cannot read the option {item!r} in {ref!r}; write options as ?key=value&key=value"
            )
        option = accepted.get(key)
        if option is None:
            known = ", ".join(sorted(accepted)) or "none"
            raise UnknownModel(f"{ref}: option {key!r} is not accepted; this source takes {known}")
        if not all(WORD.match(part) or _is_literal(part) for part in text.split(",")):
            raise UnknownModel(
                f"{ref}: option {key}={text[:64]!r} is not a number, true/false or a short "
                "lower-case word; options never name files"
            )
        options[key] = option.check(key, _parse_value(text), ref)
    return options


def _parse_value(text: str) -> OptionValue:
    if "," in text:
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


def _is_literal(text: str) -> bool:
    """A number, true/false or none: what `_parse_value` turns into a non-string."""
    return not isinstance(_parse_value(text), str) or text == ""


def _bound(value: float) -> str:
    return "" if math.isinf(value) else f"{value:g}"
