"""The statistics phase split into parts that several workers compute at once.

On a large model most of a job's time is the per-layer work of the statistics phase: each
layer's input second moment and its GPTQ candidates at every width and rule set. Layers are
independent there, so a job may cut its layers into `statistics_parts` contiguous runs (blocks,
in network order) of about equal GPTQ work, and ask other workers to compute some of them.

Who computes what is decided by claims on a `Board`, not by the messages: the job asks the
board to send one message per part to other workers, then works through the parts itself,
taking each one nobody holds; a helper takes a part only if nobody holds it either. A computed
part goes to the job's cache under a key of the job's content, where the job picks it up. A
helper that dies stops renewing its claim; once the claim lapses the job takes the part back
and computes it itself, so a lost helper costs time, never the job. The parts are the very
computations one worker does for the whole model (same rows drawn for each layer's statistics,
`costs.input_stats(only=...)`), so the plan is the one a single worker finds.

Only the `Board` protocol is here; the service implements it over its broker (`workers.parts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from allocator import costs
from allocator.cache import CODE_VERSION, Cache, digest
from allocator.layers import LayerTable
from allocator.weight_rules import RULE_SETS
from allocator.zoo.base import Inputs, LoadedModel

Candidates = dict[str, dict[tuple[str, int], costs.QuantChoice]]
"""Rule set name -> (layer, width) -> the best choice within that set."""
POLL_SECONDS = 0.5
"""How often a job waiting for its helpers looks for their parts and for lapsed claims."""


class Board(Protocol):
    """Where a job and its helpers claim parts (the service's broker)."""

    cache: Cache
    """Where parts are handed over: the cache every worker of the deployment shares."""
    scope: str
    """What a part's cache key is scoped to when the job must not reuse earlier work (its id)."""

    def dispatch(self, parts: int) -> None:
        """Ask other workers to compute parts of this job; they may or may not come."""
        ...

    def claim(self, part: int, parts: int) -> bool:
        """True when the caller may compute `part` now: nobody else holds it."""
        ...

    def renew(self, part: int, parts: int) -> None:
        """Keep a held claim from lapsing while the part is computed."""
        ...


def layer_parts(table: LayerTable, parts: int) -> list[tuple[str, ...]]:
    """The table's layers in at most `parts` contiguous runs of about equal GPTQ work (a layer
    of n output channels reading k inputs each costs about n k^2), none empty."""
    names = table.names
    parts = max(1, min(parts, len(names)))
    work = [layer.params * max(1, layer.params // layer.out_channels) for layer in table]
    total = float(sum(work)) or 1.0
    runs: list[list[str]] = [[]]
    done = 0.0
    for index, (name, cost) in enumerate(zip(names, work, strict=True)):
        unopened = parts - len(runs)
        boundary = done >= len(runs) * total / parts
        # Open the next run at a work boundary, or when each layer left must start one.
        if runs[-1] and unopened and (boundary or len(names) - index <= unopened):
            runs.append([])
        runs[-1].append(name)
        done += cost
    return [tuple(run) for run in runs]


def part_key(content: str, part: int, parts: int, scope: str = "") -> str:
    """The cache key of one part's candidates: the job's content digest, the split, and the
    job's own scope when it reuses nothing earlier jobs computed."""
    return digest("statistics part", CODE_VERSION, content, part, parts, scope)


def compute_part(
    model: LoadedModel,
    batches: Sequence[Inputs],
    table: LayerTable,
    runs: Sequence[Sequence[str]],
    part: int,
    bits: Sequence[int],
    bias_correction: bool,
    board: Board,
    key: str,
) -> Candidates:
    """Statistics and candidates of part `part` of `runs`: one pass over `batches` and GPTQ per
    layer, the claim renewed as each layer is done; handed over under `key`."""
    keep = set(runs[part])
    stats = costs.input_stats(model, batches, table, only=keep)
    value = costs.rule_set_choices(
        model,
        LayerTable(tuple(layer for layer in table if layer.name in keep)),
        stats,
        bits,
        RULE_SETS,
        bias_correction=bias_correction,
        on_layer=lambda _i: board.renew(part, len(runs)),
    )
    board.cache.put(key, encode(value))
    return value


def encode(candidates: Candidates) -> dict[str, Any]:
    """Candidates as plain containers, each choice once: rule sets that pick the same (clip,
    rounding) for a layer and width share one choice object, and a part of a large model is
    handed over through a cache that bounds its entries."""
    distinct: dict[int, int] = {}
    states: list[dict[str, Any]] = []
    sets: dict[str, list[int]] = {}
    for name, choices in candidates.items():
        for key, choice in choices.items():
            if id(choice) not in distinct:
                distinct[id(choice)] = len(states)
                states.extend(costs.choices_state({key: choice}))
            sets.setdefault(name, []).append(distinct[id(choice)])
    return {"choices": states, "sets": sets}


def decode(state: Mapping[str, Any], model: LoadedModel) -> Candidates:
    entries = state["choices"]
    choices = [costs.choices_from_state([entry], model.module) for entry in entries]
    keys = [(entry["layer"], entry["bits"]) for entry in entries]
    return {
        name: {keys[i]: choices[i][keys[i]] for i in indices}
        for name, indices in state["sets"].items()
    }


def gather(
    model: LoadedModel,
    batches: Sequence[Inputs],
    table: LayerTable,
    bits: Sequence[int],
    bias_correction: bool,
    parts: int,
    content: str,
    board: Board,
    scope: str = "",
    tick: Callable[[float, str], None] = lambda _f, _m: None,
    poll_seconds: float = POLL_SECONDS,
) -> tuple[Candidates, int]:
    """Every layer's candidates, the parts computed here or by helpers; and how many parts
    helpers computed."""
    runs = layer_parts(table, parts)
    keys = [part_key(content, index, len(runs), scope) for index in range(len(runs))]
    board.dispatch(len(runs))
    found: dict[int, Candidates] = {}
    elsewhere = 0
    while len(found) < len(runs):
        progressed = False
        for index, key in enumerate(keys):
            if index in found:
                continue
            stored = board.cache.get(key)
            if stored is not None:
                found[index], progressed = decode(stored, model), True
                elsewhere += 1
            elif board.claim(index, len(runs)):
                tick(len(found) / len(runs), f"part {index + 1}/{len(runs)}")
                found[index] = compute_part(
                    model, batches, table, runs, index, bits, bias_correction, board, key
                )
                progressed = True
        if not progressed:
            tick(len(found) / len(runs), f"waiting for {len(runs) - len(found)} parts")
            time.sleep(poll_seconds)
    merged: Candidates = {name: {} for name in RULE_SETS}
    for index in range(len(runs)):
        for name, choices in found[index].items():
            merged[name].update(choices)
    return merged, elsewhere


def help_with(
    model: LoadedModel,
    batches: Sequence[Inputs],
    table: LayerTable,
    bits: Sequence[int],
    bias_correction: bool,
    part: int,
    parts: int,
    content: str,
    board: Board,
    scope: str = "",
) -> bool:
    """A helper's side: compute `part` for the job unless it is done already; whether this call
    computed it. The caller holds the part's claim."""
    runs = layer_parts(table, parts)
    key = part_key(content, part, len(runs), scope)
    if part >= len(runs) or board.cache.get(key) is not None:
        return False
    compute_part(model, batches, table, runs, part, bits, bias_correction, board, key)
    return True
