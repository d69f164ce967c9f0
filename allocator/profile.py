"""A cached cost table read back, and the file hashes that say which inputs made it.

`profile_dict` writes a profile (layers, candidate widths, the cost matrix) as
plain JSON data; the service re-solves new budgets from it and the report prices plans with it, so
both read it through `CostTable.from_dict` instead of each rebuilding the layer table its own way.
Imports the layer table and numpy; never the solver, the model zoo or any service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allocator.layers import Layer, LayerTable

CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class CostTable:
    """`cost[i, j]`: the predicted loss of `table.layers[i]` at `bits[j]` (inf: not allowed)."""

    table: LayerTable
    bits: tuple[int, ...]
    cost: np.ndarray
    method: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostTable:
        return cls(
            table=LayerTable(
                layers=tuple(Layer(**layer) for layer in data["layers"]),
                attention_macs=data.get("attention_macs", 0),
            ),
            bits=tuple(data["bits"]),
            cost=np.asarray(data["cost"], dtype=float),
            method=data.get("method", ""),
        )

    def plan_cost(self, plan: Mapping[str, int]) -> float:
        """The summed cost of the free layers at their widths in `plan`.

        Layers whose group has a pinned member add nothing, as in the integer program's
        objective, so the cost of the plan the solver chose equals its reported objective and
        plans that share the pins compare.
        """
        column = {width: j for j, width in enumerate(self.bits)}
        pinned = self.table.pinned_widths()
        return float(
            sum(
                self.cost[i, column[plan[layer.name]]]
                for i, layer in enumerate(self.table)
                if layer.name not in pinned
            )
        )

    def uniform_plan(self, width: int) -> dict[str, int]:
        """Every free layer at `width`, pinned groups at their pin: the uniform baseline."""
        return self.table.uniform(width)


def file_sha256(path: Path) -> str:
    """The sha256 of a file read in chunks: what identifies weights and data in a profile key and
    in a report, whatever the file is called on the machine that ran the job."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def profile_dict(
    table: LayerTable, bits: tuple[int, ...], cost: np.ndarray, method: str
) -> dict[str, Any]:
    """The cached cost table: enough to re-solve any budget without touching the model."""
    return {
        "method": method,
        "bits": list(bits),
        "layers": [asdict(layer) for layer in table],
        "attention_macs": table.attention_macs,
        "cost": cost.tolist(),
    }
