"""`bitplan run`: one job end to end on the embedded default, and bad input refused cleanly."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from allocator.apply import load_packed
from allocator.zoo import load_model
from service.cli import app

# Every test here runs a whole job on ResNet20 or shares one (`finished`); each bad-input case
# runs a good job first. Out of the development subset, in CI's full run.
pytestmark = pytest.mark.slow

SHARED = Path(
    os.environ.get(
        "BITPLAN_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)


@pytest.fixture(scope="module")
def finished(resnet20_inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A BITPLAN_HOME holding one finished job, and that job's JSON."""
    home = tmp_path_factory.mktemp("home") / "data"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITPLAN_HOME", str(home))
        patch.delenv("BITPLAN_DATABASE_URL", raising=False)
        code, out, err = invoke(*base_args(*resnet20_inputs), "--budget", "avg-bits=3", "--json")
    assert code == 0, err
    return home, json.loads(out)


@pytest.fixture()
def home(finished, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BITPLAN_HOME", str(finished[0]))
    monkeypatch.delenv("BITPLAN_DATABASE_URL", raising=False)
    return finished[0]


@pytest.fixture()
def weights(resnet20_inputs: tuple[Path, Path]) -> Path:
    return resnet20_inputs[0]


@pytest.fixture()
def images(resnet20_inputs: tuple[Path, Path]) -> Path:
    return resnet20_inputs[1]


def refused(home: Path, args: list[str]) -> str:
    """Run a command that must fail on bad input; returns stderr, checks nothing stored changed."""
    before = snapshot(home)
    code, out, err = invoke(*args)
    assert code == 2, err
    assert out == ""
    assert snapshot(home) == before
    return err


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def base_args(weights: Path, images: Path) -> list[str]:
    return [
        "run",
        "--model",
        "zoo:cifar_resnet20",
        "--weights",
        str(weights),
        "--calib",
        str(images),
        "--eval",
        str(images),
        "--calib-samples",
        "32",
        "--batch-size",
        "16",
        "--method",
        "lrp+fisher",
    ]


def snapshot(folder: Path) -> dict[str, str]:
    """Artifact files by hash and the database by its rows: SQLite may checkpoint its WAL into
    the main file at any time, which changes the bytes but not what is stored."""
    files = {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("bitplan.db")
    }
    with closing(sqlite3.connect(folder / "bitplan.db")) as connection:
        files["bitplan.db"] = "\n".join(connection.iterdump())
    return files


def test_run_json_records_job_and_artifacts(finished) -> None:
    home, payload = finished
    for key in (
        "job_id",
        "model",
        "budget",
        "method",
        "allocation",
        "avg_weight_bits",
        "weight_bytes",
        "solver",
        "metrics",
        "timings",
        "artifacts",
    ):
        assert key in payload
    assert payload["solver"]["status"] == "optimal"
    assert {"name", "status", "gap", "seconds"} <= set(payload["solver"])
    assert payload["avg_weight_bits"] <= 3.3
    assert {"fp32", "quantized", "uniform"} <= set(payload["metrics"])
    assert payload["metrics"]["uniform"]["bits"] == 3
    layers = {row["layer"]: row for row in payload["allocation"]}
    assert layers["conv1"]["weight_bits"] == 8 and layers["linear"]["weight_bits"] == 8
    assert all(row["weight_bits"] in (2, 3, 4, 5, 6, 8) for row in payload["allocation"])
    artifact = Path(payload["artifacts"]["model"])
    assert artifact.is_file() and str(artifact).startswith(str(home / "artifacts"))
    assert (home / "bitplan.db").is_file()

    skeleton = load_model("zoo:cifar_resnet20").module
    reloaded, plan = load_packed(artifact, skeleton)
    assert plan.weight_bits == {name: row["weight_bits"] for name, row in layers.items()}
    assert sum(p.numel() for p in reloaded.parameters()) > 0


def test_run_stores_the_report_and_keeps_a_copy_browsers_open(finished) -> None:
    home, payload = finished
    stored = Path(payload["artifacts"]["report"])
    assert str(stored).startswith(str(home / "artifacts"))
    assert Path(payload["artifacts"]["pareto"]).read_bytes().startswith(b"\x89PNG")
    widths = [entry["bits"] for entry in payload["metrics"]["uniform_widths"]]
    assert widths == [3, 4, 5, 6, 8]
    copy = home / "reports" / f"{payload['job_id']}.html"
    assert copy.read_bytes() == stored.read_bytes()
    assert copy.read_text().startswith("<!DOCTYPE html>")


def test_no_report_skips_the_drawing_and_the_extra_widths(
    home: Path, weights: Path, images: Path
) -> None:
    code, out, err = invoke(
        *base_args(weights, images), "--bits", "4,8", "--no-report", "--no-report-widths", "--json"
    )
    assert code == 0, err
    payload = json.loads(out)
    assert set(payload["artifacts"]) == {"model", "bitplan", "profile"}
    assert not (home / "reports" / f"{payload['job_id']}.html").exists()
    assert [entry["bits"] for entry in payload["metrics"]["uniform_widths"]] == [
        payload["metrics"]["uniform"]["bits"]
    ]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["--model", "zoo:cifar_resnet21"], "cifar_resnet20"),
        (["--model", "nope:thing"], "prefix"),
        (["--budget", "avg-bits=0.5"], "smallest feasible"),
        (["--budget", "bits=4"], "avg-bits"),
        (["--method", "magic"], "lrp"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    home: Path, weights: Path, images: Path, override: list[str], needle: str
) -> None:
    code, _out, err = invoke(*base_args(weights, images), "--budget", "avg-bits=4", "--json")
    assert code == 0, err
    args = base_args(weights, images)
    flag = override[0]
    if flag in args:
        index = args.index(flag)
        args[index + 1] = override[1]
    else:
        args += override
    err = refused(home, args)
    assert needle in err
    assert len(err.strip().splitlines()) <= 2


def test_mismatched_weights_list_keys(home: Path, tmp_path: Path, images: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3), "extra.bias": torch.zeros(2)}, wrong)
    err = refused(home, base_args(wrong, images))
    assert "conv1.weight" in err and "extra.bias" in err


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_needing_code_is_refused_unexecuted(
    home: Path, tmp_path: Path, images: Path
) -> None:
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    err = refused(home, base_args(evil, images))
    assert "unpickle" in err
    assert not marker.exists()


def test_corrupt_dataset_is_refused(home: Path, tmp_path: Path, weights: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 32, 32), dtype=np.uint8))
    err = refused(home, base_args(weights, bad))
    assert "images" in err


@pytest.mark.integration
@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason=f"no shared data at {SHARED}")
def test_real_resnet20_at_three_bits_keeps_its_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_HOME", str(tmp_path / "home"))
    cifar = SHARED / "cifar10"
    code, out, err = invoke(
        "run",
        "--model",
        "zoo:cifar_resnet20",
        "--weights",
        str(cifar / "resnet20-12fca82f.th"),
        "--calib",
        str(cifar / "calib_train_jpeg.npz"),
        "--eval",
        str(cifar / "test_jpeg.npz"),
        "--eval-samples",
        "1000",
        "--calib-samples",
        "128",
        "--budget",
        "avg-bits=3",
        "--json",
    )
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    # Plain round-to-nearest W3 loses ~17 points here (64.5 vs 81.0 on the full test set).
    assert metrics["quantized"]["top1"] >= metrics["fp32"]["top1"] - 6
    assert metrics["quantized"]["top1"] >= metrics["uniform"]["top1"] - 1.0


def test_a_bad_cache_bound_is_one_line(
    home: Path, weights: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_CACHE_MAX_BYTES", "lots")
    err = refused(home, [*base_args(weights, images), "--budget", "avg-bits=4"])
    assert "BITPLAN_CACHE_MAX_BYTES='lots' is not valid" in err
    assert len(err.strip().splitlines()) <= 2
