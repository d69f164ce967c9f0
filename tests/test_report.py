"""The per-job report from a hand-made result: no model, so every number in it is known."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from allocator.job import JobSpec, Result
from allocator.job_metrics import (
    Comparison,
    Difference,
    ExportCheck,
    FitCheck,
    FloatLayer,
    JobMetrics,
    PlanCheck,
    PlanRound,
    UniformScores,
)
from allocator.layers import Layer
from allocator.plan import BitPlan, LayerPlan
from allocator.profile import CostTable, file_sha256
from allocator.report import (
    Point,
    build,
    degradation,
    rank_correlation,
    render_html,
    write_report,
)
from service.cli.output import print_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BITS = (2, 4, 8)
LAYERS = [
    Layer("stem", "conv", params=100, out_channels=4, macs=1000, group="stem", pinned_bits=8),
    Layer("body", "conv", params=1000, out_channels=8, macs=9000, group="body"),
    Layer("head", "linear", params=500, out_channels=10, macs=500, group="head"),
]
COST = [
    [9.0, 3.0, 1.0],  # a pinned layer's row never counts
    [4.0, 1.0, 0.1],
    [2.0, 0.5, 0.05],
]
MIXED = {"stem": 8, "body": 4, "head": 2}


def make_result(calib: Path) -> Result:
    """A job whose measured losses rank its plans exactly as the cost table does."""
    metric = {2: 40.0, 4: 78.0, 8: 80.0}
    return Result(
        spec=JobSpec(model="zoo:tiny", calib=str(calib), budget="avg-bits=4", bits=BITS),
        allocation=[
            {
                "layer": layer.name,
                "weight_bits": MIXED[layer.name],
                "params": layer.params,
                "clip": "mse",
                "pinned": layer.pinned_bits is not None,
                "sensitivity": {"fisher": 1.0 + i, "lrp": 0.5 * (i + 1)},
            }
            for i, layer in enumerate(LAYERS)
        ],
        avg_weight_bits=3.5,
        weight_bytes=700.0,
        solver={"name": "highs", "status": "optimal", "gap": 0.0, "seconds": 0.01},
        metrics=JobMetrics(
            primary="top1",
            fp32={"top1": 81.0, "kl": 0.0},
            quantized={"top1": 70.0, "kl": 0.2},
            uniform=UniformScores(4, {"top1": metric[4], "kl": 0.1}),
            uniform_widths=tuple(UniformScores(b, {"top1": metric[b], "kl": 8 / b}) for b in BITS),
            predicted_cost=3.0,
        ),
        timings={"load": 0.1, "solve": 0.01},
        plan=BitPlan(layers={name: LayerPlan(weight_bits=b) for name, b in MIXED.items()}),
        profile={
            "method": "fisher",
            "bits": list(BITS),
            "layers": [vars(layer) for layer in LAYERS],
            "attention_macs": 0,
            "cost": COST,
        },
        job_id="job-1",
    )


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Result:
    calib = tmp_path_factory.mktemp("inputs") / "calib.npz"
    calib.write_bytes(b"not really images")
    return make_result(calib)


@pytest.fixture(scope="module")
def written(result: Result, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One report for the tests that only read it (drawing it takes about a second)."""
    folder = tmp_path_factory.mktemp("report")
    return {name: Path(path) for name, path in write_report(folder, result).items()}


def test_the_html_stands_alone_with_its_images_embedded(written: dict[str, Path]) -> None:
    page = written["report"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page.lower()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3
    pareto = written["pareto"].read_bytes()
    assert pareto.startswith(PNG_SIGNATURE)
    assert base64.b64encode(pareto).decode() in images


def test_the_page_names_the_inputs_the_solver_and_the_correlation(
    written: dict[str, Path], result: Result
) -> None:
    page = written["report"].read_text()
    assert f"<code>{file_sha256(Path(result.spec.calib))}</code>" in page
    for text in ("zoo:tiny", "avg-bits=4", "calib_samples", "optimal", "W2", "W8", "mixed"):
        assert text in page
    assert "<b>1.000</b>" in page  # the hand-made losses rank exactly as predicted


def test_pngs_are_valid_pngs(written: dict[str, Path]) -> None:
    from PIL import Image

    with Image.open(written["pareto"]) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 400


def test_points_are_priced_with_the_cost_table(result: Result) -> None:
    report = build(result)
    labels = [point.label for point in report.measured]
    assert labels == ["FP32", "W2", "W4", "W8", "mixed"]
    predicted = {point.label: point.predicted for point in report.measured}
    assert predicted == pytest.approx({"FP32": 0, "W2": 6, "W4": 1.5, "W8": 0.15, "mixed": 3})
    mixed = report.measured[-1]
    assert mixed.avg_bits == pytest.approx((100 * 8 + 1000 * 4 + 500 * 2) / 1600)
    assert report.degradation(mixed) == pytest.approx(11.0)
    assert report.rank_correlation == pytest.approx(1.0)
    assert report.frontier and all(p.predicted >= 0 for p in report.frontier)
    assert max(p.predicted for p in report.frontier) <= predicted["W2"]


def test_plan_cost_matches_the_solver_objective_and_skips_pins(result: Result) -> None:
    costs = CostTable.from_dict(result.profile)
    assert costs.plan_cost(MIXED) == pytest.approx(result.metrics.predicted_cost)
    assert costs.uniform_plan(2) == {"stem": 8, "body": 2, "head": 2}


def test_spearman_on_a_known_case() -> None:
    # Ranks (1, 2, 3, 4, 5) against (2, 1, 4, 3, 5): sum d^2 = 4, rho = 1 - 6*4/(5*24) = 0.8.
    assert rank_correlation([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2], [1, 2]) is None
    assert rank_correlation([1, 2, 3], [5, 5, 5]) is None


def test_degradation_is_positive_when_worse_whichever_way_the_metric_runs(
    result: Result,
) -> None:
    report = build(result)
    fp32, w2 = report.measured[0], report.measured[1]
    assert degradation("top1", fp32, w2) == pytest.approx(41.0)
    lower_is_better = Point("FP32", "fp32", 1.0, 32, 0.0, quality=0.0)
    worse = Point("W2", "uniform", 0.1, 2, 1.0, quality=0.3)
    assert degradation("kl", lower_is_better, worse) == pytest.approx(0.3)


def test_a_width_the_table_forbids_leaves_its_plans_out_but_still_reports(
    result: Result, tmp_path: Path
) -> None:
    forbidding = [row[:] for row in COST]
    forbidding[1][0] = float("inf")  # body may not take 2 bits
    result = replace(result, profile={**result.profile, "cost": forbidding})
    report = build(result)
    assert report.frontier == []  # the narrowest uniform size admits no plan
    assert report.measured[1].label == "W2" and report.measured[1].predicted == float("inf")
    assert report.rank_correlation == pytest.approx(1.0)  # W4, W8 and mixed still rank
    page = Path(write_report(tmp_path, result)["report"]).read_text()
    assert "<b>1.000</b>" in page


def test_a_job_with_activations_reports_bops(result: Result, tmp_path: Path) -> None:
    """With activations quantized the points carry BOPs and the page adds a quality/BOPs chart."""
    widths = tuple(replace(u, act_bits=8) for u in result.metrics.uniform_widths)
    metrics = replace(result.metrics, uniform_widths=widths)
    acts = replace(result, metrics=metrics, act_allocation=[{"site": "body"}], bops=123_000.0)
    points = {p.label: p for p in build(acts).measured}
    assert points["W4A8"].bops == (1000 * 8 + 9000 * 4 + 500 * 4) * 8
    assert points["mixed"].bops == 123_000.0
    assert points["FP32"].bops == 10_500 * 32 * 32
    page = Path(write_report(tmp_path, acts)["report"]).read_text()
    assert "GBOPs" in page
    assert page.count("data:image/png;base64,") == 4
    assert all(p.bops is None for p in build(result).measured)


EXPORT_CHECK = ExportCheck(
    format="onnx",
    passed=True,
    error=None,
    samples=10_000,
    max_abs_diff=2.1e-5,
    mean_abs_diff=2.4e-6,
    output_range=56.0,
    tolerance=1e-3,
    metric="top1",
    runtime_metric=76.52,
    bitplan_metric=76.52,
    metric_tolerance=0.1,
    storage={"INT4": 18, "INT8": 3},
    activation_sites=0,
    file_bytes=233_224,
    runtime="onnxruntime 1.32.0 CPUExecutionProvider",
    over_tolerance=0,
    runtime_defaults={"max_abs_diff": 2.1e-5, "runtime_metric": 76.52},
)


def test_metrics_keep_the_json_shape_results_store(result: Result) -> None:
    """`metrics` in results (API, database, `bitplan run --json`) keeps its keys and reads back."""
    metrics = replace(
        result.metrics,
        act_rules={"8": {"chosen": {"post-ln": "channel"}}},
        plan_check=PlanCheck(0.5, 0.25, "uniform"),
        float_layers=(FloatLayer("conv1d", "Conv1d", 24, "nn.Conv2d only"),),
        calibration="in-network",
        fit_check=FitCheck(3, 0.07, 0.15, "in-network"),
        rounds=(PlanRound(0, 0.2, 0, True), PlanRound(1, 0.25, 3, False)),
        exports={"onnx": EXPORT_CHECK},
    )
    data = json.loads(json.dumps(metrics.to_dict()))
    assert list(data) == [
        "fp32",
        "quantized",
        "uniform",
        "uniform_widths",
        "primary",
        "weight_rules",
        "act_rules",
        "plan_check",
        "float_layers",
        "predicted_cost",
        "comparison",
        "eval_source",
        "calibration",
        "fit_check",
        "rounds",
        "exports",
    ]
    assert data["exports"]["onnx"]["storage"] == {"INT4": 18, "INT8": 3}
    assert data["fit_check"] == {"bits": 3, "in_network": 0.07, "fp32": 0.15, "chose": "in-network"}
    assert data["rounds"][1] == {"round": 1, "divergence": 0.25, "changed": 3, "kept": False}
    assert data["uniform"] == {"bits": 4, "act_bits": None, "top1": 78.0, "kl": 0.1}
    assert data["plan_check"] == {"mixed": 0.5, "uniform": 0.25, "kept": "uniform"}
    assert data["float_layers"][0]["reason"] == "nn.Conv2d only"
    assert JobMetrics.from_dict(data) == metrics
    assert "act_rules" not in result.metrics.to_dict()  # float activations: no key, as before
    assert result.to_json()["metrics"] == result.metrics.to_dict()


COMPARISON = Comparison(
    primary=Difference("top1", -0.53, -0.9, -0.15),
    closeness=Difference("agreement", 1.4, 0.6, 2.2),
    samples=500,
    resamples=2000,
)


def test_metrics_read_back_with_and_without_the_comparison_and_eval_source(
    result: Result,
) -> None:
    with_both = replace(result.metrics, comparison=COMPARISON, eval_source="holdout")
    data = json.loads(json.dumps(with_both.to_dict()))
    assert data["eval_source"] == "holdout"
    assert data["comparison"]["verdict"] == "worse"
    assert data["comparison"]["primary"] == {
        "metric": "top1",
        "value": -0.53,
        "low": -0.9,
        "high": -0.15,
    }
    assert JobMetrics.from_dict(data) == with_both
    older = result.metrics.to_dict()  # a result stored before either key existed
    del older["comparison"], older["eval_source"]
    read = JobMetrics.from_dict(older)
    assert (read.comparison, read.eval_source) == (None, "eval")
    assert result.metrics.to_dict()["comparison"] is None


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("holdout", "held-out part of the calibration data"),
        ("eval", "your --eval file"),
        ("calibration", "the calibration data (explicit)"),
    ],
)
def test_the_page_gives_the_verdict_with_its_interval_and_the_eval_source(
    result: Result, source: str, shown: str
) -> None:
    metrics = replace(result.metrics, comparison=COMPARISON, eval_source=source)
    page = render_html(
        replace(result, metrics=metrics),
        build(result),
        {"pareto": b"", "layers": b"", "degradation": b""},
    )
    assert "Mixed vs uniform W4 at the same size, on the same samples: <b>worse</b>" in page
    assert "top1 -0.53 [-0.90, -0.15], agreement with FP32 +1.40 [+0.60, +2.20]" in page
    assert "95% paired bootstrap intervals over 500 samples" in page
    assert f"Evaluated on: {shown}." in page


def test_a_page_without_a_comparison_still_says_what_it_was_evaluated_on(
    written: dict[str, Path],
) -> None:
    page = written["report"].read_text()
    assert "Evaluated on: your --eval file." in page
    assert "paired bootstrap" not in page


def test_the_page_and_summary_say_how_weights_were_fitted_and_what_each_round_measured(
    result: Result, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rounds = (PlanRound(0, 0.0807, 0, True), PlanRound(1, 0.1116, 6, False))
    fitted = replace(
        result, metrics=replace(result.metrics, calibration="in-network", rounds=rounds)
    )
    page = Path(write_report(tmp_path, fitted)["report"]).read_text()
    assert "Weights fitted in the network" in page
    assert "0.0807 -&gt; 0.1116 (not kept)" in page
    plain = Path(write_report(tmp_path / "plain", result)["report"]).read_text()
    assert "Weights fitted on FP32 inputs." in plain
    print_summary({**fitted.to_json(), "job_id": "j"})
    assert "plan rounds in context: held-out divergence by round 0.0807 -> 0.1116 (not kept)" in (
        capsys.readouterr().out
    )


def test_a_chosen_fit_says_why_on_the_page_and_in_the_summary(
    result: Result, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    check = FitCheck(3, 0.0912, 0.0433, "fp32")
    chosen = replace(result, metrics=replace(result.metrics, calibration="fp32", fit_check=check))
    page = Path(write_report(tmp_path, chosen)["report"]).read_text()
    why = (
        "on FP32 inputs (chosen by held-out divergence of uniform W3: 0.0912 in the network, "
        "0.0433 on FP32 inputs)"
    )
    assert f"Weights fitted {why}" in page
    print_summary({**chosen.to_json(), "job_id": "j"})
    assert f"weights fitted {why}" in capsys.readouterr().out
