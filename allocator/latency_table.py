"""A measured latency table: milliseconds per (weight layer, weight width, activation width) on
one runtime and machine, and what a plan is predicted to take from it.

`bitplan profile-latency` (and a job with a latency budget that measures its own) times each
weight layer alone at each candidate (`allocator.export.latency`); a latency budget
(`latency-ms=`, `latency=0.6x`, `allocator.budget`) is then a third resource of the integer
program, each layer's entry at its chosen widths adding up like its storage does. A plan's
predicted latency is `rest_ms` (what the layers' entries do not cover: pooling, additions,
activation functions, the runtime's call overhead, measured once on the FP32 model) plus the
sum of its layers' entries; jobs report it beside the latency measured end to end.

Keys: a table holds for one model content (`allocator.cache.digest` of the module), input
shape, runtime (`LATENCY_RUNTIMES`), runtime version and machine (CPU model, cores, ISA flags,
threads; `fingerprint`). The database keeps tables under that key (`db.repositories.latency`).

Torch- and numpy-free: the job types, the budget and the database read tables without loading
torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from allocator.errors import BadSpec

LATENCY_RUNTIMES = ("onnxruntime-cpu", "torch-cpu", "torch-cuda")
"""Where a table can be measured: ONNX Runtime's CPU provider running the QDQ model bitplan
exports, or torch running bitplan's own dequantized model on the CPU or a CUDA device."""
FLOAT_WIDTH = 32
"""The width a float weight or a float (not quantized) activation is entered at."""
FLOAT_ACT_FROM = 16
"""Activation widths from here up are not quantized (`allocator.quant.activation`)."""
FORMAT = "bitplan-latency-v1"


class LatencyStatus(StrEnum):
    """Where a requested table is: measured on the target's queue (`queued`, `running`), then
    `succeeded` with its entries or `failed` with the reason."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def choice_key(weight_bits: int, act_bits: int) -> str:
    """`W4A8`, `W8A32` (float activations), `W32A32` (FP32): how entries are named."""
    return f"W{weight_bits}A{act_width(act_bits)}"


def act_width(act_bits: int) -> int:
    """The width an activation runs at: 16 bits and up are float."""
    return FLOAT_WIDTH if act_bits >= FLOAT_ACT_FROM else act_bits


def parse_shape(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """`1,3,32,32` or `1x3x32x32` -> (1, 3, 32, 32); every dimension positive."""
    if isinstance(text, (tuple, list)):
        values = [int(v) for v in text]
    else:
        parts = text.replace("x", ",").split(",")
        try:
            values = [int(part) for part in parts if part.strip()]
        except ValueError:
            raise BadSpec(
                f"input shape {text!r} is not a list of integers, e.g. 1,3,32,32"
            ) from None
    if not values or len(values) > 6 or any(v < 1 or v > 1_000_000 for v in values):
        raise BadSpec(f"input shape {text!r} needs 1 to 6 positive dimensions, e.g. 1,3,32,32")
    return tuple(values)


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def fingerprint(machine: Mapping[str, Any]) -> str:
    """A sha256 of the machine description (canonical JSON): part of a table's key."""
    text = json.dumps(dict(machine), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_runtime(runtime: str) -> None:
    if runtime not in LATENCY_RUNTIMES:
        raise BadSpec(
            f"latency runtime {str(runtime)[:40]!r} is not one of {', '.join(LATENCY_RUNTIMES)}"
        )


@dataclass(frozen=True)
class LatencyTable:
    """Per layer, milliseconds per choice (`choice_key`), measured with warm-up and repeats
    (the median); `rest_ms` covers what no layer entry does. `flat` says every weight width
    runs the same kernel on this runtime (torch has no low-bit kernels), so only activation
    widths can differ."""

    model_sha256: str
    input_shape: tuple[int, ...]
    runtime: str
    runtime_version: str
    machine: Mapping[str, Any]
    entries: Mapping[str, Mapping[str, float]]
    rest_ms: float = 0.0
    fp32_measured_ms: float | None = None
    """The FP32 model timed end to end when the table was measured."""
    act_rest_ms: Mapping[str, float] = field(default_factory=dict)
    """Per quantized activation width, the rest of a run with every activation site at it
    (what no layer entry holds: the sites' QDQ, the attention matmuls between quantized sites),
    where it was measured; `ms` shares its difference from `rest_ms` among the layers."""
    flat: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Warm-up, repeats, threads, and how candidates map onto measured kernels."""
    notes: tuple[str, ...] = ()
    table_id: str | None = field(default=None, compare=False)
    """The database row's id, once stored."""

    @property
    def machine_sha256(self) -> str:
        return fingerprint(self.machine)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What the database keys a table by."""
        return (
            self.model_sha256,
            shape_text(self.input_shape),
            self.runtime,
            self.runtime_version,
            self.machine_sha256,
        )

    def ms(self, layer: str, weight_bits: int, act_bits: int) -> float:
        """The entry of `layer` at a choice; a missing one is a `BadSpec` naming how to fix it."""
        row = self.entries.get(layer)
        if row is None:
            raise BadSpec(
                f"the latency table has no entry for layer {layer}: it was measured on another "
                "model; profile this model (bitplan profile-latency)"
            )
        key = choice_key(weight_bits, act_bits)
        if key not in row:
            raise BadSpec(
                f"the latency table has no entry for layer {layer} at {key} (it has "
                f"{', '.join(sorted(row))}); profile with these widths"
            )
        return float(row[key]) + self._rest_share(act_bits)

    def _rest_share(self, act_bits: int) -> float:
        """One layer's share of how much a run's rest changes when activations run at
        `act_bits` (0 in float, or where that rest was not measured): a plan with every site
        at one width is predicted its measured rest, and one with some sites quantized moves
        part of the way."""
        rest = self.act_rest_ms.get(str(act_width(act_bits)))
        if rest is None or act_width(act_bits) == FLOAT_WIDTH or not self.entries:
            return 0.0
        return (float(rest) - self.rest_ms) / len(self.entries)

    def predict(self, weights: Mapping[str, int], acts: int | Mapping[str, int]) -> float:
        """A plan's predicted latency: `rest_ms` plus each layer's entry at its widths."""
        total = self.rest_ms
        for layer, bits in weights.items():
            act = acts if isinstance(acts, int) else acts[layer]
            total += self.ms(layer, bits, act)
        return total

    def fp32_ms(self, layers: list[str] | None = None) -> float:
        """The FP32 model's predicted latency: what `latency=0.6x` is relative to."""
        names = layers if layers is not None else list(self.entries)
        return self.predict(dict.fromkeys(names, FLOAT_WIDTH), FLOAT_WIDTH)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_sha256": self.model_sha256,
            "input_shape": list(self.input_shape),
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "machine": dict(self.machine),
            "machine_sha256": self.machine_sha256,
            "entries": {layer: dict(row) for layer, row in self.entries.items()},
            "rest_ms": self.rest_ms,
            "fp32_measured_ms": self.fp32_measured_ms,
            "act_rest_ms": dict(self.act_rest_ms),
            "flat": self.flat,
            "settings": dict(self.settings),
            "notes": list(self.notes),
            "table_id": self.table_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        if data.get("format") != FORMAT:
            raise BadSpec(f"not a latency table (format {str(data.get('format'))[:40]!r})")
        return cls(
            model_sha256=str(data["model_sha256"]),
            input_shape=tuple(int(v) for v in data["input_shape"]),
            runtime=str(data["runtime"]),
            runtime_version=str(data["runtime_version"]),
            machine=dict(data["machine"]),
            entries={
                str(layer): {str(k): float(v) for k, v in row.items()}
                for layer, row in data["entries"].items()
            },
            rest_ms=float(data.get("rest_ms", 0.0)),
            fp32_measured_ms=data.get("fp32_measured_ms"),
            act_rest_ms={str(k): float(v) for k, v in (data.get("act_rest_ms") or {}).items()},
            flat=bool(data.get("flat", False)),
            settings=dict(data.get("settings") or {}),
            notes=tuple(data.get("notes") or ()),
            table_id=data.get("table_id"),
        )

    def summary(self) -> str:
        """One line: where, and the FP32 prediction against its end-to-end measurement."""
        measured = (
            f", measured {self.fp32_measured_ms:.3f} ms end to end"
            if self.fp32_measured_ms is not None
            else ""
        )
        return (
            f"{self.runtime} {self.runtime_version} on {self.machine.get('cpu', '?')} "
            f"({self.machine.get('threads', '?')} threads), input {shape_text(self.input_shape)}: "
            f"{len(self.entries)} layers, FP32 {self.fp32_ms():.3f} ms predicted{measured}"
        )
