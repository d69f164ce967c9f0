"""The statistics phase split into parts: same candidates as one pass, whoever computes them."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from allocator import costs, split
from allocator.cache import Cache, FolderCache
from allocator.job import JobSpec
from allocator.layers import LayerTable, build_layer_table
from allocator.pipeline import run
from allocator.prepare import help_with_part
from allocator.weight_rules import RULE_SETS
from allocator.zoo import load_model
from allocator.zoo.base import LoadedModel


@dataclass
class LocalBoard:
    """A board in one process: claims held until `lapse` seconds pass without a renewal."""

    cache: Cache
    scope: str = "job"
    lapse: float = 60.0
    holder: str = "job"
    dispatched: list[int] = field(default_factory=list)
    claims: dict[int, tuple[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def dispatch(self, parts: int) -> None:
        self.dispatched.append(parts)

    def claim(self, part: int, parts: int) -> bool:
        with self.lock:
            held = self.claims.get(part)
            if held is not None and time.monotonic() - held[1] < self.lapse:
                return False
            self.claims[part] = (self.holder, time.monotonic())
            return True

    def renew(self, part: int, parts: int) -> None:
        with self.lock:
            self.claims[part] = (self.claims[part][0], time.monotonic())


@dataclass(frozen=True)
class Case:
    """ResNet20 on 32x32 images: early layers see more positions than a batch samples, so rows
    are drawn; `expected` is what one pass over every layer gives."""

    model: LoadedModel
    batches: list[torch.Tensor]
    table: LayerTable
    expected: split.Candidates

    def gather(self, board: LocalBoard, parts: int, **options: float) -> tuple:
        return split.gather(
            self.model, self.batches, self.table, (2, 4), True, parts, "c", board, **options
        )


@pytest.fixture(scope="module")
def resnet() -> Case:
    torch.manual_seed(0)
    model = load_model("zoo:cifar_resnet20")
    batches = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    table = build_layer_table(model, batches[0][:1])
    stats = costs.input_stats(model, batches, table)
    expected = costs.rule_set_choices(model, table, stats, (2, 4), RULE_SETS)
    return Case(model, batches, table, expected)


def same(a: split.Candidates, b: split.Candidates) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key, choice in a[name].items():
            assert torch.equal(choice.quantized.codes, b[name][key].quantized.codes), key
            assert choice.output_error == pytest.approx(b[name][key].output_error, rel=1e-6)


def test_parts_are_contiguous_non_empty_and_balanced() -> None:
    model = load_model("zoo:cifar_resnet20")
    table = build_layer_table(model, torch.randn(1, 3, 32, 32))
    for parts in (1, 2, 3, 5, len(table), len(table) + 7):
        runs = split.layer_parts(table, parts)
        assert len(runs) == min(parts, len(table))
        assert all(runs) and [name for run in runs for name in run] == table.names
    work = {layer.name: layer.params * (layer.params // layer.out_channels) for layer in table}
    shares = [sum(work[name] for name in run) for run in split.layer_parts(table, 3)]
    assert max(shares) < 0.6 * sum(shares)


def test_parts_computed_here_equal_one_pass(resnet: Case, tmp_path: Path) -> None:
    board = LocalBoard(FolderCache(tmp_path))
    merged, elsewhere = resnet.gather(board, 3)
    assert (elsewhere, board.dispatched) == (0, [3])
    same(merged, resnet.expected)


def test_a_part_a_helper_computed_is_picked_up_not_recomputed(resnet: Case, tmp_path: Path) -> None:
    board = LocalBoard(FolderCache(tmp_path), holder="helper")
    assert board.claim(2, 3)
    helping = (resnet.model, resnet.batches, resnet.table, (2, 4), True, 2, 3, "c", board)
    assert split.help_with(*helping)
    assert not split.help_with(*helping)
    board.holder = "job"
    merged, elsewhere = resnet.gather(board, 3)
    assert elsewhere == 1
    same(merged, resnet.expected)


def test_a_part_whose_helper_died_is_taken_back_once_its_claim_lapses(
    resnet: Case, tmp_path: Path
) -> None:
    board = LocalBoard(FolderCache(tmp_path), lapse=0.5, holder="dead helper")
    assert board.claim(1, 2)  # and never computes it
    board.holder = "job"
    started = time.monotonic()
    merged, elsewhere = resnet.gather(board, 2, poll_seconds=0.05)
    assert elsewhere == 0 and board.claims[1][0] == "job"
    assert time.monotonic() - started >= 0.5
    same(merged, resnet.expected)


def test_a_split_job_returns_the_plan_of_a_whole_one(resnet20_job: JobSpec, tmp_path: Path) -> None:
    """A helper computes one part through `help_with_part` (what a service worker runs), the
    job the rest; plan and metrics equal the unsplit job's, and the profile says who did what."""
    spec = replace(resnet20_job, statistics_parts=2, reuse=False)
    board = LocalBoard(FolderCache(tmp_path / "cache"), holder="helper")
    assert board.claim(0, 2)
    assert help_with_part(spec, 0, board)
    board.holder = "job"
    parted = run(spec, board=board)
    alone = run(replace(spec, statistics_parts=1))
    assert parted.plan.layers == alone.plan.layers
    assert parted.metrics.to_dict() == alone.metrics.to_dict()
    assert parted.phases["statistics"]["parts"] == 2
    assert parted.phases["statistics"]["parts_by_helpers"] == 1
    assert "parts" not in alone.phases["statistics"]
    # Without a board nobody can help: the spec's split changes nothing.
    assert run(spec).plan.layers == alone.plan.layers


def test_a_part_stores_each_choice_once_and_reads_back_the_same(resnet: Case) -> None:
    """Rule sets that pick the same choice share it in the stored part (a part of a large model
    must fit the cache's entry bound), and it reads back as the same candidates."""
    state = split.encode(resnet.expected)
    entries = sum(len(indices) for indices in state["sets"].values())
    assert len(state["choices"]) < entries
    same(split.decode(state, resnet.model), resnet.expected)
