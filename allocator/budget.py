"""Budgets: the text a user writes for "how small" and the numbers the integer program needs.

A budget has at most one size term and at most one BOPs term, joined by commas:

- `avg-bits=B`: the weight storage a model would need with every layer at B bits (codes plus
  per-channel float16 scales, `LayerTable.uniform_storage_bits`), so `avg-bits=4` fits a plan
  exactly as large as uniform 4-bit;
- `size-mb=M`: M * 1e6 bytes of weight storage, codes and scales;
- `compression=C`: FP32 weight storage (32 bits per parameter) divided by C;
- `bops=N`: at most N bit operations per input sample, a plain float such as `1.2e9`
  (BOPs of a layer = MACs per sample x weight bits x activation bits);
- `latency-ms=T` or `latency=Rx`: at most T milliseconds, or R times the FP32 model's, as a
  measured latency table predicts them (`allocator.latency_table`: the sum of each layer's
  entry at its chosen widths, plus what no layer entry covers); at most one latency term,
  alone or with a size term and BOPs (`avg-bits=4,latency=0.7x`);
- `match=WxAy` (e.g. `match=W4A8`), alone: the weight storage of uniform x-bit weights and the
  BOPs of uniform WxAy on this model (pinned layers at their widths), the budget that compares a
  mixed plan with the uniform one it replaces.

Parsing needs no model; `Budget.resolve` turns the terms into bits, BOPs and milliseconds for
one layer table (and, for a latency term, one latency table). Imports only the typed errors at
run time (the layer and latency tables for type hints), so front ends can validate a budget
without loading torch; never solvers or services.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from allocator.errors import BadBudget

if TYPE_CHECKING:
    from allocator.latency_table import LatencyTable
    from allocator.layers import LayerTable

BITS_PER_MB = 8e6
"""One MB is 1e6 bytes of weight storage, as file sizes are counted."""
FP32_BITS = 32


def _avg_bits(table: LayerTable, value: float) -> float:
    return table.uniform_storage_bits(value)


def _size_mb(_table: LayerTable, value: float) -> float:
    return value * BITS_PER_MB


def _compression(table: LayerTable, value: float) -> float:
    return FP32_BITS * table.total_params / value


SIZE_FORMS: dict[str, Callable[[LayerTable, float], float]] = {
    "avg-bits": _avg_bits,
    "size-mb": _size_mb,
    "compression": _compression,
}
"""Each size term and how it becomes weight-storage bits for a layer table."""
BOPS_FORM = "bops"
MATCH_FORM = "match"
LATENCY_MS_FORM = "latency-ms"
LATENCY_RATIO_FORM = "latency"
"""`latency=0.6x`: relative to the FP32 model's latency on the same table."""
LATENCY_FORMS = (LATENCY_MS_FORM, LATENCY_RATIO_FORM)
ACCEPTED = (
    "avg-bits=4, size-mb=1.5, compression=8, bops=1.2e9, latency-ms=3.2, latency=0.6x, "
    "match=W4A8, or one size term, bops and one latency term joined by ',' "
    "(avg-bits=4,latency=0.7x)"
)


@dataclass(frozen=True)
class ResolvedBudget:
    """What the integer program enforces: total weight-storage bits, BOPs per sample and
    predicted milliseconds.

    `None` leaves that resource unconstrained. `latency` is the table `latency_ms` is
    predicted on; the solver prices every choice from it.
    """

    size_bits: float | None = None
    bops: float | None = None
    latency_ms: float | None = None
    latency: LatencyTable | None = None


@dataclass(frozen=True)
class Budget:
    """A parsed budget; `size_form` is a key of `SIZE_FORMS`, `str()` gives the text back."""

    size_form: str | None = None
    size_value: float | None = None
    bops: float | None = None
    match: tuple[int, int] | None = None
    """(weight bits, activation bits) of `match=WxAy`."""
    latency_ms: float | None = None
    latency_ratio: float | None = None
    """`latency=0.6x`: the share of the FP32 model's predicted latency."""

    @property
    def needs_latency(self) -> bool:
        """Whether resolving this budget needs a latency table."""
        return self.latency_ms is not None or self.latency_ratio is not None

    def resolve(
        self, table: LayerTable, act_bits: int = 32, latency: LatencyTable | None = None
    ) -> ResolvedBudget:
        """Bits, BOPs and milliseconds for this table.

        `act_bits` is the activation width the plan will run at. Today every term is absolute
        (a BOPs budget is a count, not a width), so none of them reads it; it is part of the
        signature so callers already pass it when activation widths become choices.
        A latency term is resolved on `latency`; without one it is left out (a size check
        before the latency table exists), so whoever enforces the budget must pass the table
        when `needs_latency` (the pipeline refuses a job without one).
        """
        if self.match is not None:
            weight, act = self.match
            bops = sum(layer.macs * (layer.pinned_bits or weight) * act for layer in table)
            return ResolvedBudget(size_bits=table.uniform_storage_bits(weight), bops=float(bops))
        size_bits = (
            None
            if self.size_form is None or self.size_value is None
            else SIZE_FORMS[self.size_form](table, self.size_value)
        )
        limit = None
        if latency is not None and self.needs_latency:
            limit = (
                self.latency_ms
                if self.latency_ms is not None
                else (self.latency_ratio or 0.0) * latency.fp32_ms(table.names)
            )
        return ResolvedBudget(
            size_bits=size_bits,
            bops=self.bops,
            latency_ms=limit,
            latency=latency if limit is not None else None,
        )

    def __str__(self) -> str:
        if self.match is not None:
            return f"{MATCH_FORM}=W{self.match[0]}A{self.match[1]}"
        terms = []
        if self.size_form is not None and self.size_value is not None:
            terms.append(f"{self.size_form}={_number_text(self.size_value)}")
        if self.bops is not None:
            terms.append(f"{BOPS_FORM}={_number_text(self.bops)}")
        if self.latency_ms is not None:
            terms.append(f"{LATENCY_MS_FORM}={_number_text(self.latency_ms)}")
        if self.latency_ratio is not None:
            terms.append(f"{LATENCY_RATIO_FORM}={_number_text(self.latency_ratio)}x")
        return ",".join(terms)


def parse_budget(text: str) -> Budget:
    """Parse `avg-bits=4`, `size-mb=1.5`, `compression=8`, `bops=1.2e9`, `latency-ms=3.2`,
    `latency=0.6x`, those joined by ',' (one term of each kind), or `match=W4A8`."""
    key, _, raw = text.partition("=")
    if key.strip() == MATCH_FORM:
        found = re.fullmatch(r"\s*W(\d+)A(\d+)\s*", raw, flags=re.IGNORECASE)
        if found is None:
            raise BadBudget(
                f"cannot read {text!r}: write match=W<weight bits>A<activation bits>, e.g. match=W4A8"
            )
        return Budget(match=(int(found.group(1)), int(found.group(2))))
    terms: dict[str, float] = {}
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in (*SIZE_FORMS, BOPS_FORM, *LATENCY_FORMS):
            raise BadBudget(f"cannot read budget term {item.strip()!r} in {text!r}; use {ACCEPTED}")
        if key in terms:
            raise BadBudget(f"budget {text!r} gives {key} twice; use {ACCEPTED}")
        if key == LATENCY_RATIO_FORM:
            if not raw.strip().lower().endswith("x"):
                raise BadBudget(
                    f"latency={raw.strip()!r} in {text!r}: write a ratio to FP32 with an x "
                    "(latency=0.6x) or milliseconds (latency-ms=3.2)"
                )
            raw = raw.strip()[:-1]
        terms[key] = _positive_number(key, raw, text)
    sizes = [key for key in terms if key in SIZE_FORMS]
    if len(sizes) > 1:
        raise BadBudget(
            f"budget {text!r} gives {' and '.join(sizes)}; give at most one size term, use {ACCEPTED}"
        )
    if all(form in terms for form in LATENCY_FORMS):
        raise BadBudget(f"budget {text!r} gives two latency terms; give one, use {ACCEPTED}")
    size_form = sizes[0] if sizes else None
    return Budget(
        size_form=size_form,
        size_value=terms[size_form] if size_form else None,
        bops=terms.get(BOPS_FORM),
        latency_ms=terms.get(LATENCY_MS_FORM),
        latency_ratio=terms.get(LATENCY_RATIO_FORM),
    )


def _positive_number(key: str, raw: str, text: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise BadBudget(
            f"{key}={raw.strip()!r} in {text!r} is not a number; use {ACCEPTED}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise BadBudget(f"{key} must be a positive finite number, got {raw.strip()!r} in {text!r}")
    return value


def _number_text(value: float) -> str:
    """The shortest text that parses back to exactly `value` (`4`, not `4.0`)."""
    short = format(value, "g")
    return short if float(short) == value else repr(value)
