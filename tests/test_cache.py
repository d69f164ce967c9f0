"""The content-keyed cache: what it keeps, how it reads back, and a job run twice on it."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from allocator import costs
from allocator.cache import Cache, FolderCache, cached, digest
from allocator.job import JobSpec
from allocator.layers import build_layer_table
from allocator.pipeline import run
from allocator.zoo.base import LoadedModel


def check_round_trip(cache: Cache) -> str:
    """Any `Cache` gives back a stored value as it was written, and nothing for another key;
    returns the key it stored under."""
    key = digest("entry")
    value = {"cost": torch.arange(6.0).reshape(2, 3), "names": ["a", "b"], "bits": {3: 0.5}}
    cache.put(key, value)
    again = cache.get(key)
    assert torch.equal(again["cost"], value["cost"])
    assert again["names"] == ["a", "b"] and again["bits"] == {3: 0.5}
    assert cache.get(digest("other")) is None
    return key


def test_an_entry_reads_back_as_it_was_written(tmp_path: Path) -> None:
    check_round_trip(FolderCache(tmp_path))


def test_a_torn_entry_is_dropped_and_recomputed(tmp_path: Path) -> None:
    cache = FolderCache(tmp_path)
    key = digest("torn")
    cache.put(key, {"x": torch.ones(3)})
    path = tmp_path / key[:2] / key
    path.write_bytes(path.read_bytes()[:20])
    assert cache.get(key) is None
    assert not path.exists()
    value, reused = cached(cache, key, lambda: 7)
    assert (value, reused) == (7, False)
    assert cached(cache, key, lambda: 8) == (7, True)


def test_an_entry_that_would_run_code_is_never_loaded(tmp_path: Path) -> None:
    """Entries are read with `weights_only`: a pickle naming a callable is refused, dropped."""
    cache = FolderCache(tmp_path)
    key = digest("hostile")
    path = tmp_path / key[:2] / key
    path.parent.mkdir(parents=True)
    torch.save({"f": os.system}, path)
    assert cache.get(key) is None
    assert not path.exists()


def test_the_least_recently_used_entries_go_first_over_the_bound(tmp_path: Path) -> None:
    probe = FolderCache(tmp_path / "probe")
    probe.put(digest("size"), torch.zeros(900))
    size = (tmp_path / "probe" / digest("size")[:2] / digest("size")).stat().st_size
    cache = FolderCache(tmp_path / "cache", max_bytes=int(3.5 * size))  # room for three
    keys = [digest("entry", i) for i in range(3)]
    for age, key in enumerate(keys):
        cache.put(key, torch.zeros(900))
        os.utime(cache.root / key[:2] / key, (1000 + age, 1000 + age))
    cache.get(keys[0])  # used again: now the newest
    cache.put(digest("entry", 3), torch.zeros(900))
    assert cache.get(keys[1]) is None
    assert cache.get(keys[0]) is not None and cache.get(keys[2]) is not None


def test_a_key_is_64_hex_digits_and_nothing_else(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a cache key"):
        FolderCache(tmp_path).get("../../etc/passwd")


def test_digests_tell_apart_what_changes_the_numbers() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 2)
    base = digest(layer, [torch.ones(2, 4)], (3, 4))
    assert base == digest(layer, [torch.ones(2, 4)], (3, 4))
    with torch.no_grad():
        layer.weight[0, 0] += 1e-6
    assert digest(layer, [torch.ones(2, 4)], (3, 4)) != base
    assert digest("ab", "c") != digest("a", "bc")
    assert digest(torch.ones(2, 2)) != digest(torch.ones(4))
    assert digest(torch.ones(2, dtype=torch.float64)) != digest(torch.ones(2))
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
    assert digest(np.zeros(3)) == digest(torch.zeros(3, dtype=torch.float64))


def test_choices_read_back_with_the_weight_errors_recomputed() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    model = LoadedModel(ref="mlp", module=module, task="classification", input_kind="tabular")
    batches = [torch.randn(32, 8)]
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    choices = costs.quant_choices(model, table, costs.input_stats(model, batches, table), (2, 4))
    again = costs.choices_from_state(costs.choices_state(choices), module)
    assert again.keys() == choices.keys()
    for key, choice in choices.items():
        other = again[key]
        assert torch.equal(other.quantized.codes, choice.quantized.codes)
        assert torch.equal(other.weight_error, choice.weight_error)
        assert (other.clip, other.rounding, other.output_error) == (
            choice.clip,
            choice.rounding,
            choice.output_error,
        )


def test_the_same_job_again_reuses_every_step_and_returns_the_same_plan(
    resnet20_job: JobSpec, tmp_path: Path
) -> None:
    spec = replace(resnet20_job, budget="avg-bits=3.5", calibration="in-network", context_rounds=1)
    cache = FolderCache(tmp_path / "cache")
    first = run(spec, cache=cache)
    second = run(spec, cache=cache)
    assert first.reused == {}  # a job finding what it computed itself reused nothing
    assert set(second.reused) >= {
        "statistics",
        "sensitivity",
        "fits",
        "evaluations",
        "held-out checks",
    }
    # The evaluation passes over the 48 images ran in the first job, never in the second.
    assert first.phases["evaluate"]["samples"] >= 2 * 48
    assert second.phases["evaluate"]["samples"] == 0
    assert second.phases["statistics"]["forwards"] < first.phases["statistics"]["forwards"]
    assert second.plan.layers == first.plan.layers
    assert second.metrics.to_dict() == first.metrics.to_dict()
    assert "statistics" not in run(replace(spec, reuse=False), cache=cache).reused
    other = run(replace(spec, budget="avg-bits=4.5"), cache=cache)
    assert {"statistics", "sensitivity"} <= set(other.reused)
    assert other.metrics.fp32 == first.metrics.fp32
