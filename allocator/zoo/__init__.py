"""One verb to turn a model reference into a `LoadedModel`: `load_model("timm:resnet18")`.

A reference is `<prefix>:<name>`; the prefix picks a source. Built-in sources (`zoo:`, `timm:`,
`hf:`) register themselves with `@register_source`; anyone else ships a source as the entry
point `<prefix>` in the group `bitplan.models`, found only when a reference asks for a prefix
nobody registered. Built-in source modules are imported on first use, so importing
`allocator.zoo.base` stays cheap and never pulls in timm or transformers.

References come from tenants, so a source also says how to check one without building it
(`check_ref`: unknown names and options are refused in milliseconds, at submit), which server
paths a reference makes it open (`ref_paths`: the service confines them to allowed folders
where they are opened), and whether it can build the model on the meta device, where a model of
any size costs no memory (`meta_model`: memory is estimated before a job allocates anything).
A plugin's reference takes no `?options`: the part after the prefix is its name, as written.

Never imports the rest of `allocator` beyond `errors` and `zoo.*`.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import torch

from allocator.errors import UnknownModel
from allocator.zoo.base import Inputs, LoadedModel

Source = Callable[[str, Path | None], LoadedModel]
"""Builds the model `name` (the part after the prefix), fitting `weights` when given."""

ZooModel = Callable[[Path | None], LoadedModel]
"""Builds one built-in `zoo:` model, fitting `weights` when given."""

ENTRY_POINT_GROUP = "bitplan.models"

BUILTIN_SOURCE_MODULES = (
    "allocator.zoo.cifar_resnet",
    "allocator.zoo.timm_source",
    "allocator.zoo.hf_source",
)

ALIASES = {"minilm": "hf:minilm"}
"""Bare names accepted as whole references."""

MAX_REF_LENGTH = 2048


@dataclass(frozen=True)
class SourceEntry:
    """A registered source: `load` builds; `check` refuses a bad name (and options) cheaply;
    `paths` lists the server paths a name makes `load` open; `meta` says `load(name, None)`
    under `torch.device("meta")` builds the module without allocating or reading anything."""

    load: Source
    check: Callable[[str], None] | None = None
    paths: Callable[[str], list[Path]] | None = None
    meta: bool = False


_SOURCES: dict[str, SourceEntry] = {}
_ZOO_MODELS: dict[str, ZooModel] = {}

__all__ = [
    "ENTRY_POINT_GROUP",
    "Inputs",
    "LoadedModel",
    "Source",
    "check_ref",
    "close_matches",
    "known_prefixes",
    "load_model",
    "meta_model",
    "ref_paths",
    "register_source",
    "register_zoo_model",
]


def register_source(
    prefix: str,
    *,
    check: Callable[[str], None] | None = None,
    paths: Callable[[str], list[Path]] | None = None,
    meta: bool = False,
) -> Callable[[Source], Source]:
    """Make `fn` the source for references `<prefix>:...` (see `SourceEntry` for the rest)."""

    def decorate(fn: Source) -> Source:
        if prefix in _SOURCES and _SOURCES[prefix].load is not fn:
            raise ValueError(f"model source prefix {prefix!r} is already registered")
        _SOURCES[prefix] = SourceEntry(fn, check, paths, meta)
        return fn

    return decorate


def register_zoo_model(name: str) -> Callable[[ZooModel], ZooModel]:
    """Make `fn` the factory behind `zoo:<name>`."""

    def decorate(fn: ZooModel) -> ZooModel:
        if name in _ZOO_MODELS and _ZOO_MODELS[name] is not fn:
            raise ValueError(f"zoo model {name!r} is already registered")
        _ZOO_MODELS[name] = fn
        return fn

    return decorate


def load_model(ref: str, weights: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Build the model `ref` names, in eval mode, float32, on the CPU.

    Those three guarantees are enforced here rather than trusted to each source, because every
    later phase (sensitivity, quantization, evaluation) assumes them.
    """
    ref, entry, name = _resolve(ref)
    model = entry.load(name, Path(weights) if weights is not None else None)
    if not isinstance(model, LoadedModel):
        raise UnknownModel(
            f"the source for {ref.partition(':')[0]!r} returned {type(model).__name__}, not a LoadedModel; "
            "fix the package that provides it"
        )
    model.ref = ref
    model.module.eval().float().to("cpu")
    return model


def check_ref(ref: str) -> None:
    """Raise `UnknownModel` for a reference `load_model` would refuse, without building it:
    an unknown prefix or name (with close matches), an option the source does not accept."""
    _, entry, name = _resolve(ref)
    if entry.check is not None:
        entry.check(name)


def ref_paths(ref: str) -> list[Path]:
    """The server paths loading `ref` would open (an `hf:` folder), to confine them."""
    _, entry, name = _resolve(ref)
    return entry.paths(name) if entry.paths is not None else []


def meta_model(ref: str) -> LoadedModel | None:
    """`ref` built on the meta device (shapes, no storage), or None when its source cannot
    build without reading files; for estimating a job's memory before it allocates any."""
    ref, entry, name = _resolve(ref)
    if not entry.meta:
        return None
    with torch.device("meta"):
        model = entry.load(name, None)
    model.ref = ref
    return model


def _resolve(ref: str) -> tuple[str, SourceEntry, str]:
    """(the reference with aliases expanded, its source, the name after the prefix)."""
    if len(ref) > MAX_REF_LENGTH:
        raise UnknownModel(f"model reference is longer than {MAX_REF_LENGTH} characters")
    ref = ALIASES.get(ref, ref)
    prefix, colon, name = ref.partition(":")
    if not colon or not prefix or not name:
        raise UnknownModel(
            f"model reference {ref!r} is not <prefix>:<name>; "
            f"use one of the prefixes {', '.join(known_prefixes())} (e.g. timm:resnet18)"
        )
    return ref, _source(prefix, ref), name


def known_prefixes() -> list[str]:
    """Registered prefixes plus those installed plugins offer, sorted."""
    _import_builtins()
    return sorted(set(_SOURCES) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def close_matches(name: str, candidates: list[str]) -> str:
    """A ' (did you mean ...?)' suffix for an error message, empty when nothing is close."""
    matches = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def _zoo_factory(name: str) -> ZooModel:
    factory = _ZOO_MODELS.get(name)
    if factory is None:
        raise UnknownModel(
            f"no built-in model zoo:{name}{close_matches(name, sorted(_ZOO_MODELS))}; "
            f"built-ins are {', '.join(f'zoo:{known}' for known in sorted(_ZOO_MODELS))}"
        )
    return factory


def _check_zoo(name: str) -> None:
    _zoo_factory(name)


@register_source("zoo", check=_check_zoo, meta=True)
def _zoo_source(name: str, weights: Path | None) -> LoadedModel:
    return _zoo_factory(name)(weights)


def _source(prefix: str, ref: str) -> SourceEntry:
    _import_builtins()
    if prefix not in _SOURCES:
        _load_plugin(prefix, ref)
    return _SOURCES[prefix]


def _import_builtins() -> None:
    for module_name in BUILTIN_SOURCE_MODULES:
        importlib.import_module(module_name)


def _load_plugin(prefix: str, ref: str) -> None:
    found = entry_points(group=ENTRY_POINT_GROUP).select(name=prefix)
    if not found:
        prefixes = known_prefixes()
        raise UnknownModel(
            f"unknown model source {prefix!r} in {ref!r}{close_matches(prefix, prefixes)}; "
            f"known prefixes are {', '.join(prefixes)}, or install a package that provides "
            f"the {ENTRY_POINT_GROUP!r} entry point {prefix!r}"
        )
    entry_point = next(iter(found))
    try:
        source = entry_point.load()
    except Exception as exc:  # a broken plugin must not look like a missing one
        raise UnknownModel(
            f"the plugin for {prefix!r} ({entry_point.value}) failed to import "
            f"({type(exc).__name__}: {exc}); reinstall or fix the package that provides it"
        ) from None
    if not callable(source):
        raise UnknownModel(
            f"the plugin for {prefix!r} ({entry_point.value}) is not callable; it must be "
            "a function (name, weights) -> LoadedModel"
        )
    register_source(prefix, check=_plain_name)(source)


def _plain_name(name: str) -> None:
    """Plugins declare no options, so a query string would reach their code unchecked."""
    if "?" in name:
        raise UnknownModel(
            f"{name!r}: references to plugin sources take no ?options; the package that "
            "provides the source registers a name per variant"
        )
