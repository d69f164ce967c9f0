"""Benchmarks run end to end at toy sizes, so `bench/solver_speed.py` and the trainer of
`bench/train_tiny_lm.py` cannot rot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from allocator.job import JobSpec
from allocator.zoo import load_model
from bench.solver_speed import markdown, measure, measure_resolves, targets
from bench.train_tiny_lm import STSB, TrainConfig, train


def test_solver_speed_bench_at_ten_layers() -> None:
    rows = measure(sizes=(10,), solvers=("highs", "cbc"), rel_gaps=(1e-3,))
    resolves = measure_resolves(layers=10, count=3)
    assert {(row.constraints, row.solution.solver) for row in rows} == {
        ("size", "knapsack"),  # one binding resource: the exact knapsack search answers
        ("size", "cbc"),
        ("size+bops", "highs"),
        ("size+bops", "cbc"),
    }
    assert all(row.solution.status == "optimal" for row in rows)
    assert all(r.statuses == {"optimal"} and len(r.times_ms) == 3 for r in resolves)
    table = markdown(rows, resolves)
    assert table.count("| 10 |") == len(rows) + len(resolves)
    assert len(targets(rows, resolves)) == 2 * len(resolves)


def test_tiny_lm_trainer_writes_a_folder_bitplan_loads(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="needs pip install 'bitplan[bench]'")
    if not (STSB / "sts-train.csv").exists():
        pytest.skip(f"needs the STS-B sentences in {STSB} (../shared/data)")
    toy = TrainConfig(
        vocab=300, hidden=32, layers=1, heads=2, intermediate=64, window=32, batch=4, steps=3,
        warmup=1,
    )  # fmt: skip
    stsb = tmp_path / "stsb"
    stsb.mkdir()
    for name in ("sts-train.csv", "sts-dev.csv"):
        head = (STSB / name).read_text(encoding="utf-8").splitlines()[:200]
        (stsb / name).write_text("\n".join(head) + "\n", encoding="utf-8")
    perplexity = train(tmp_path, toy, stsb)
    loaded = load_model(f"hf:{tmp_path / 'model'}")
    assert loaded.task == "causal-lm"
    assert loaded.context_length == toy.window
    # Three steps leave the model near a uniform guess over its vocabulary.
    assert 1 < perplexity < 2 * toy.vocab and math.isfinite(perplexity)
    train_lines = (tmp_path / "train.txt").read_text(encoding="utf-8").splitlines()
    dev_lines = (tmp_path / "dev.txt").read_text(encoding="utf-8").splitlines()
    assert (len(train_lines), len(dev_lines)) == (400, 400)


def test_phase_bench_prints_every_phase_and_the_second_runs(resnet20_job: JobSpec) -> None:
    from bench.phases import section

    text = section("toy", resnet20_job, "avg-bits=3")
    for phase in ("load", "statistics", "sensitivity", "solve", "evaluate"):
        assert f"| {phase} | " in text
    again = next(line for line in text.splitlines() if line.startswith("| same job again"))
    assert "statistics x1" in again and "evaluations" in again
    assert "| same model at avg-bits=3 |" in text
