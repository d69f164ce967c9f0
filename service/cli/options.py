"""The options the `bitplan` commands share, declared once: a job's spec (`run` and `submit`
take the same ones, with `JobSpec`'s defaults), the server and key of the remote commands, and
`--json`.

`spec_options` gives a command every job option; the command receives a `SpecFactory` and
builds (so validates) the spec inside its own error handling. Imports only `allocator.job` of
the allocator: never torch, SQLAlchemy or the web stack.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from allocator.errors import BitplanError
from allocator.job import JobSpec

DEFAULTS = JobSpec(model="", calib="")
"""Where the spec options' defaults come from, so the CLI and the API cannot drift apart."""

ModelOpt = Annotated[str, typer.Option(help="timm:<name>, hf:<dir> or hf:minilm, zoo:<name>")]
CalibOpt = Annotated[
    str, typer.Option(help=".npz images, STS-B style .csv/.tsv, or .txt text (causal LMs)")
]
WeightsOpt = Annotated[str | None, typer.Option(help=".safetensors or .pth/.th")]
EvalOpt = Annotated[
    str | None,
    typer.Option(
        "--eval",
        help="evaluation data (without it, part of the calibration data is held out for it)",
    ),
]
EvalOnCalibrationOpt = Annotated[
    bool,
    typer.Option(
        "--eval-on-calibration",
        help="evaluate on the calibration data itself, holding none out (scores look better "
        "than on unseen data)",
    ),
]
BudgetOpt = Annotated[
    str,
    typer.Option(
        help="avg-bits=, size-mb=, compression=, bops=, latency-ms=, latency=0.6x, match=W4A8"
    ),
]
MethodOpt = Annotated[str, typer.Option(help="lrp, fisher, hessian, measured, or a+b")]
BitsOpt = Annotated[str, typer.Option(help="candidate weight bit-widths")]
CalibSamplesOpt = Annotated[int, typer.Option()]
BatchSizeOpt = Annotated[int, typer.Option()]
EvalSamplesOpt = Annotated[int | None, typer.Option(help="evaluate on the first N")]
PinOpt = Annotated[list[str] | None, typer.Option(help="LAYER=BITS, repeatable")]
PinFirstLastOpt = Annotated[bool, typer.Option(help="stem and head at 8 bits")]
BiasCorrectionOpt = Annotated[bool, typer.Option()]
TimeLimitOpt = Annotated[float, typer.Option(help="solver seconds")]
SeedOpt = Annotated[int, typer.Option()]
ReportWidthsOpt = Annotated[
    bool, typer.Option(help="also measure uniform W3..W8 for the report (one eval pass each)")
]
ReportOpt = Annotated[bool, typer.Option(help="draw report.html and pareto.png")]
ActBitsOpt = Annotated[
    str | None,
    typer.Option(help="activation bits 4, 6, 8, 16, or auto to allocate them (default: float)"),
]
ActQuantizersOpt = Annotated[str, typer.Option(help="auto, baseline, repq, isvit, dopq or log2")]
CalibrationOpt = Annotated[
    str,
    typer.Option(
        help="in-network: fit each layer on the quantized network's inputs; fp32: on FP32 "
        "inputs; auto: whichever keeps the uniform plan closer to FP32 on held-out samples"
    ),
]
ContextRoundsOpt = Annotated[
    int, typer.Option(help="re-solves with costs measured around the plan (0: solve once)")
]
StatisticsPartsOpt = Annotated[
    int,
    typer.Option(
        help="split the statistics phase into this many blocks of layers that other workers "
        "of the server compute at once (same plan)"
    ),
]
ExportOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--export", help="also export the model: onnx (checked in ONNX Runtime); repeatable"
    ),
]
LatencyTableOpt = Annotated[
    str | None,
    typer.Option(
        help="a stored latency table's id (bitplan profile-latency) or its JSON file: what a "
        "latency budget is priced on"
    ),
]
LatencyRuntimeOpt = Annotated[
    str | None,
    typer.Option(
        help="measure the latency table in the job: onnxruntime-cpu, torch-cpu or torch-cuda"
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        help="cpu, cuda or cuda:N (default: $BITPLAN_DEVICE for run, the worker's for submit, "
        "else cpu)"
    ),
]
DEFAULT_BITS_TEXT = ",".join(map(str, DEFAULTS.bits))

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]
ServerOpt = Annotated[
    str, typer.Option(envvar="BITPLAN_SERVER", help="the API's base URL, e.g. http://host:8000")
]
KeyOpt = Annotated[str, typer.Option(envvar="BITPLAN_API_KEY", help="an API key (bp_...)")]


def parse_pins(pins: list[str]) -> dict[str, int]:
    parsed = {}
    for pin in pins:
        name, _, bits = pin.partition("=")
        if not name or not bits.isdigit():
            raise BitplanError(f"--pin takes LAYER=BITS (e.g. head=8), got {pin!r}")
        parsed[name] = int(bits)
    return parsed


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise BitplanError(
            f"--bits takes a comma-separated list such as 2,3,4,8, got {text!r}"
        ) from None


def parse_act_bits(text: str | None) -> int | str | None:
    """`--act-bits 8` or `--act-bits auto`."""
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise BitplanError(f"--act-bits takes 4, 6, 8, 16 or auto, got {text!r}") from None


def build_spec(
    *,
    model: ModelOpt,
    calib: CalibOpt,
    weights: WeightsOpt = DEFAULTS.weights,
    eval: EvalOpt = DEFAULTS.eval,
    eval_on_calibration: EvalOnCalibrationOpt = False,
    budget: BudgetOpt = DEFAULTS.budget,
    method: MethodOpt = DEFAULTS.method,
    bits: BitsOpt = DEFAULT_BITS_TEXT,
    calib_samples: CalibSamplesOpt = DEFAULTS.calib_samples,
    batch_size: BatchSizeOpt = DEFAULTS.batch_size,
    eval_samples: EvalSamplesOpt = DEFAULTS.eval_samples,
    pin: PinOpt = None,
    pin_first_last: PinFirstLastOpt = DEFAULTS.pin_first_last,
    bias_correction: BiasCorrectionOpt = DEFAULTS.bias_correction,
    time_limit: TimeLimitOpt = DEFAULTS.time_limit,
    seed: SeedOpt = DEFAULTS.seed,
    report_widths: ReportWidthsOpt = DEFAULTS.report_widths,
    report: ReportOpt = DEFAULTS.report,
    act_bits: ActBitsOpt = DEFAULTS.act_bits,
    act_quantizers: ActQuantizersOpt = DEFAULTS.act_quantizers,
    calibration: CalibrationOpt = DEFAULTS.calibration,
    context_rounds: ContextRoundsOpt = DEFAULTS.context_rounds,
    statistics_parts: StatisticsPartsOpt = DEFAULTS.statistics_parts,
    export: ExportOpt = None,
    latency_table: LatencyTableOpt = DEFAULTS.latency_table,
    latency_runtime: LatencyRuntimeOpt = DEFAULTS.latency_runtime,
    device: DeviceOpt = DEFAULTS.device,
) -> JobSpec:
    """The validated spec the options of `run` and `submit` describe; its parameters are those
    options (see `spec_options`).

    `--eval-on-calibration` is the explicit choice to score on the calibration data: the spec
    names the calibration file as its evaluation file too, which the job reports as evaluated
    on "the calibration data" (`allocator.data.eval_source`); without `--eval` a job holds out
    part of its calibration data instead."""
    if eval_on_calibration and eval is not None:
        raise BitplanError(
            "--eval-on-calibration evaluates on the calibration file; drop it or drop --eval"
        )
    spec = JobSpec(
        model=model,
        weights=weights,
        calib=calib,
        eval=calib if eval_on_calibration else eval,
        budget=budget,
        method=method,
        bits=parse_bits(bits),
        calib_samples=calib_samples,
        batch_size=batch_size,
        eval_samples=eval_samples,
        pin_first_last=pin_first_last,
        pins=parse_pins(pin or []),
        bias_correction=bias_correction,
        time_limit=time_limit,
        seed=seed,
        report_widths=report_widths,
        report=report,
        act_bits=parse_act_bits(act_bits),
        act_quantizers=act_quantizers,
        calibration=calibration,
        context_rounds=context_rounds,
        statistics_parts=statistics_parts,
        export=tuple(export or ()),
        latency_table=latency_table,
        latency_runtime=latency_runtime,
        device=device,
    )
    spec.validate()
    return spec


SpecFactory = Callable[[], JobSpec]
"""What a command decorated with `spec_options` receives as `spec`: building the spec validates
it, so the command calls it inside its own error handling (local or remote)."""


def spec_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` every option of `build_spec` besides its own, so `run` and `submit` take
    the same job options from one definition; the command gets them as `spec: SpecFactory`."""
    spec_params = list(inspect.signature(build_spec, eval_str=True).parameters.values())
    own = [
        p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "spec"
    ]
    names = [p.name for p in spec_params]

    @functools.wraps(command)
    def with_spec(**options: Any) -> None:
        chosen = {name: options.pop(name) for name in names}
        command(spec=functools.partial(build_spec, **chosen), **options)

    merged = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in [*spec_params, *own]]
    merged.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # required ones first
    with_spec.__signature__ = inspect.Signature(merged)  # type: ignore[attr-defined]
    with_spec.__annotations__ = {p.name: p.annotation for p in merged}
    return with_spec
