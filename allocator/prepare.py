"""`prepare(spec)`: load the model and data, measure the layers and gather the calibration
statistics, the budget-free part of a job, into a `allocator.workbench.Workbench`.

`allocator.pipeline.run` prepares one per job; benchmarks prepare one per model and try many
methods and budgets on it. The checks that let a bad model or an oversized job fail in one line
before any statistics are gathered live here too (the service runs `check_memory` at submit).
"""

from __future__ import annotations

import torch

from allocator import costs, memory, split
from allocator.activation_bench import ActivationBench
from allocator.budget import Budget, parse_budget
from allocator.cache import CODE_VERSION, Cache, cached, digest
from allocator.clock import Clock
from allocator.data import (
    DEFAULT_BATCH_SIZE,
    Dataset,
    EvalSet,
    calibration_batches,
    eval_source,
    holdout_batches,
    load_dataset,
    split_for_eval,
)
from allocator.device import CPU, BatchSizes, batch_sizes, free_memory, full_float32, resolve
from allocator.errors import BitplanError, UnsupportedModel
from allocator.job import (
    FLOAT_ACTS,
    JobSpec,
    act_widths,
)
from allocator.layers import build_layer_table
from allocator.limits import Limits
from allocator.solve import check_budget
from allocator.split import Board
from allocator.weight_rules import (
    RULE_SETS,
    RuleSelection,
    fp32_outputs,
    select_rules,
)
from allocator.workbench import Workbench
from allocator.zoo import load_model
from allocator.zoo.base import Inputs, LoadedModel
from allocator.zoo.weights import first_line


def prepare(
    spec: JobSpec,
    clock: Clock | None = None,
    budget: Budget | None = None,
    limits: Limits | None = None,
    cache: Cache | None = None,
    board: Board | None = None,
) -> Workbench:
    """Load, measure the layers and gather the calibration statistics (the budget-free part).

    With `budget`, an infeasible one fails as soon as the layer table is known. A job whose
    estimated memory is above `limits` fails before its calibration samples are prepared, and
    one whose device this machine lacks before anything is loaded (`allocator.device`). The
    model is checked and measured on the CPU, then moved to the device; on a GPU the batch
    sizes follow its free memory (`device_batch_sizes`).
    With `cache`, statistics an earlier job gathered on the same content are reused, and the
    workbench keeps and reuses its fits, cost tables and evaluations there too.
    With `board` and `spec.statistics_parts` above 1, other workers compute parts of the
    statistics (`allocator.split`), handed over through `board.cache`.
    """
    clock = clock or Clock()
    limits = limits or Limits()
    acts = act_widths(spec, budget or parse_budget(spec.budget))
    device = resolve(spec.device)
    full_float32(device)
    with clock.phase("load"):
        model, calib, eval_data, source, sizes, batches = _load(spec, limits, device, clock)
        evalset = EvalSet(eval_data, model, batch_size=sizes.evaluation, limit=spec.eval_samples)
    with clock.phase("layers"):
        table = build_layer_table(
            model, _first(batches[0]), pin_first_last=spec.pin_first_last, pins=spec.pins
        )
        if budget is not None:
            check_budget(table, spec.bits, budget.resolve(table), acts=acts or FLOAT_ACTS)
    with clock.phase("statistics") as tick:
        holdout = holdout_batches(calib, model, spec.calib_samples, sizes.calibration, spec.seed)
        reference = fp32_outputs(model, holdout)
        splits = board is not None and spec.statistics_parts > 1
        content = "" if cache is None and not splits else _content(spec, model, batches, holdout)
        helped = 0

        def gather() -> tuple[costs.Choices, RuleSelection]:
            nonlocal helped
            if board is not None and splits:
                candidates, helped = split.gather(
                    model,
                    batches,
                    table,
                    spec.bits,
                    spec.bias_correction,
                    spec.statistics_parts,
                    content,
                    board,
                    scope="" if spec.reuse else board.scope,
                    tick=lambda f, message: tick(0.7 * f, message),
                )
            else:
                stats = costs.input_stats(
                    model, batches, table, on_batch=lambda i: tick((i + 1) / len(batches), "inputs")
                )
                candidates = costs.rule_set_choices(
                    model, table, stats, spec.bits, RULE_SETS, bias_correction=spec.bias_correction
                )
            tick(0.7, "weight rules")
            return select_rules(model, table, candidates, holdout, reference)

        (choices, rules), reused = cached(
            cache,
            digest("statistics", CODE_VERSION, content),
            gather,
            lambda value: {"choices": costs.choices_state(value[0]), "rules": value[1].to_state()},
            lambda state: (
                costs.choices_from_state(state["choices"], model.module),
                RuleSelection.from_state(state["rules"]),
            ),
        )
        tick(1.0, "activations")
        activations = (
            ActivationBench(model, batches, table, holdout, reference) if acts is not None else None
        )
    if splits:
        clock.phases["statistics"].update(
            parts=len(split.layer_parts(table, spec.statistics_parts)), parts_by_helpers=helped
        )
    return Workbench(
        spec,
        model,
        batches,
        evalset,
        table,
        dict(choices),
        activations,
        rules,
        holdout,
        reference,
        source,
        cache=cache,
        content=content,
        reused={"statistics": 1} if reused else {},
        batch_sizes=sizes,
    )


def _load(
    spec: JobSpec, limits: Limits, device: torch.device, clock: Clock
) -> tuple[LoadedModel, Dataset, Dataset, str, BatchSizes, list[Inputs]]:
    """The model on its device, the calibration and evaluation data, where the latter came
    from, the batch sizes, and the calibration batches; a model that cannot run a calibration
    sample or would not fit `limits` fails here."""
    model = load_model(spec.model, spec.weights)
    clock.watch(model.module)
    calib, eval_data, source = load_data(spec, limits)
    sample = calibration_batches(calib, model, 1, 1, spec.seed)[0]
    check_forward(model, sample)
    estimate = check_memory(spec, model, sample, limits)
    sizes = device_batch_sizes(spec, device, estimate)
    model.to(device)
    batches = calibration_batches(calib, model, spec.calib_samples, sizes.calibration, spec.seed)
    return model, calib, eval_data, source, sizes, batches


def help_with_part(spec: JobSpec, part: int, board: Board, limits: Limits | None = None) -> bool:
    """A helper worker's share of another worker's job: compute statistics part `part` of
    `spec.statistics_parts` into `board.cache` (`allocator.split`). Loads what the job loads,
    so the content key is the job's; whether this call computed the part (False: it was done).
    The caller holds the part's claim."""
    limits = limits or Limits()
    device = resolve(spec.device)
    full_float32(device)
    clock = Clock()
    model, calib, _, _, sizes, batches = _load(spec, limits, device, clock)
    table = build_layer_table(
        model, _first(batches[0]), pin_first_last=spec.pin_first_last, pins=spec.pins
    )
    holdout = holdout_batches(calib, model, spec.calib_samples, sizes.calibration, spec.seed)
    return split.help_with(
        model,
        batches,
        table,
        spec.bits,
        spec.bias_correction,
        part,
        spec.statistics_parts,
        _content(spec, model, batches, holdout),
        board,
        scope="" if spec.reuse else board.scope,
    )


def _content(
    spec: JobSpec, model: LoadedModel, batches: list[Inputs], holdout: list[Inputs]
) -> str:
    """What a job's statistics, fits, cost tables and checks depend on, as one digest: the
    model's architecture name and weights, the model-ready calibration and held-out samples,
    and the options that change those computations (the seed too: Hutchinson draws probes).
    A GPU's numbers equal the CPU's only within float rounding, so work done on another kind of
    device is never reused: its kind is in the key (not for the CPU, whose keys stay as they
    were before devices existed)."""
    kind = model.device.type
    on_device = () if kind == CPU.type else (("device", kind),)
    return digest(
        *on_device,
        model.ref,
        model.module,
        batches,
        holdout,
        list(spec.bits),
        spec.bias_correction,
        spec.pin_first_last,
        dict(spec.pins),
        spec.seed,
        {name: [list(clips), list(roundings)] for name, (clips, roundings) in RULE_SETS.items()},
    )


def load_data(spec: JobSpec, limits: Limits) -> tuple[Dataset, Dataset, str]:
    """The job's calibration data, its evaluation data and where that came from (a key of
    `EVAL_SOURCES`): the `--eval` file, the part of the calibration file held out for it, or
    the calibration file itself. An export of a finished job evaluates on the same samples."""
    calib = load_dataset(spec.calib, max_bytes=limits.max_dataset_bytes)
    source = eval_source(spec.calib, spec.eval)
    if source == "holdout":
        calib, eval_data = split_for_eval(calib, seed=spec.seed)
    elif source == "calibration":
        eval_data = calib
    else:
        assert spec.eval is not None  # eval_source says "eval" only for a named file
        eval_data = load_dataset(spec.eval, max_bytes=limits.max_dataset_bytes)
    return calib, eval_data, source


def check_forward(model: LoadedModel, sample: Inputs) -> None:
    """Run the model once on one prepared sample, so that a model that cannot run on its data
    (options that do not fit the architecture, a fixed input size) fails in one line naming
    the input, not with a traceback from deep inside its forward."""
    try:
        with torch.no_grad():
            model(sample)
    except BitplanError:
        raise
    except Exception as exc:  # the model's own code: any error it raises
        shape = (
            tuple(sample.shape)
            if isinstance(sample, torch.Tensor)
            else {key: tuple(value.shape) for key, value in sample.items()}
        )
        raise UnsupportedModel(
            f"{model.ref} fails on one calibration sample of shape {shape}: {first_line(exc)}; "
            "check that its options (input size, channels) fit the architecture and the data"
        ) from None


def check_memory(
    spec: JobSpec, model: LoadedModel, sample: Inputs, limits: Limits
) -> memory.MemoryEstimate:
    """Refuse the job when its estimated peak memory is above `limits.max_job_memory`; the
    estimate, for sizing batches on a GPU."""
    estimate = memory.estimate(
        model,
        sample,
        batch_size=spec.batch_size,
        samples=spec.calib_samples,
        widths=len(spec.bits),
    )
    estimate.check(limits.max_job_memory)
    return estimate


def device_batch_sizes(
    spec: JobSpec, device: torch.device, estimate: memory.MemoryEstimate
) -> BatchSizes:
    """The calibration and evaluation batch sizes: the spec's and `DEFAULT_BATCH_SIZE` on the
    CPU (what jobs always used); on a GPU, from its free memory and the job's estimate
    (`allocator.device.batch_sizes`)."""
    if device.type == "cpu":
        return BatchSizes(spec.batch_size, DEFAULT_BATCH_SIZE)
    return batch_sizes(estimate.on_device(free_memory(device)), spec.batch_size, str(device))


def _first(inputs: Inputs) -> Inputs:
    """One sample of a batch: MACs are counted per sample."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1]
    return {k: v[:1] for k, v in inputs.items()}
