"""Activation quantization tables of bench/quality.py (`--act`): uniform WxAy per quantizer preset,
mixed weights at the size and BOPs of uniform W4A8 and W4A4, joint W/A plans, and which quantizer
`auto` picks per role.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality_models import avg_bits  # noqa: E402

from allocator.activation_bench import (  # noqa: E402
    ACT_QUANTIZERS,
    CANDIDATES,
    PER_SITE,
    quantizers,
)
from allocator.budget import parse_budget  # noqa: E402
from allocator.data.evaluate import (  # noqa: E402
    HIGHER_IS_BETTER,
)
from allocator.job import ACT_BITS, FixedActs, JointActs  # noqa: E402
from allocator.pipeline import JobSpec, prepare  # noqa: E402
from allocator.solve import Solution, solve, uniform_bits_for  # noqa: E402

UNIFORM_WA = ((8, 8), (6, 6), (4, 8), (4, 4))
MATCHED = ("W4A8", "W4A4")


def act_options() -> list[str]:
    """`auto`'s options for a role: per-site, then every candidate kind of any role."""
    return [PER_SITE, *sorted({k for kinds in CANDIDATES.values() for k in kinds})]


def act_section(name: str, spec: JobSpec, method: str) -> str:
    """Uniform WxAy per activation-quantizer preset, mixed weights at matched size and BOPs,
    and which quantizer `auto` picks per role."""
    started = time.perf_counter()
    # Weights fitted on FP32 inputs: this table compares activation quantizers, many plans each.
    spec = replace(spec, calibration="fp32")
    bench = prepare(spec, budget=parse_budget("match=W4A8"))
    acts = bench.activations
    primary = bench.evalset.primary_metric
    fp32 = bench.evaluate()[primary]
    presets = list(ACT_QUANTIZERS)
    lines = [
        f"### {name} activations ({spec.model}, {primary} on {bench.evalset.size} eval samples, "
        f"{len(acts.sites)} activation sites), FP32 {fp32:.2f}",
        "",
        "| weights / activations | " + " | ".join(presets) + " |",
        "|---|" + "---|" * len(presets),
    ]
    uniform_wa: dict[tuple[int, int, str], float] = {}
    for w, a in UNIFORM_WA:
        module = bench.quantize(bench.uniform_plan(w))
        for preset in presets:
            activations = quantizers(acts.assign(a, preset))
            uniform_wa[w, a, preset] = bench.evaluate(module, activations)[primary]
        cells = " | ".join(f"{uniform_wa[w, a, preset]:.2f}" for preset in presets)
        lines.append(f"| uniform W{w}A{a} | {cells} |")
    cost, _sens, _timings = bench.cost_table(method)
    errors = {key: choice.output_error for key, choice in bench.choices.items()}

    def checked(
        solution: Solution, table_cost: np.ndarray, match: str, preset: str, joint_table: bool
    ) -> tuple[float, dict[str, int], int | dict[str, int], str]:
        """What a job returns for `solution`: it or, when the held-out check prefers it, the
        uniform plan it matches; the metric, weight widths, site widths and a row label."""
        budget = parse_budget(f"match={match}")
        a = budget.match[1]
        resolved = budget.resolve(bench.table)
        uniform_w = uniform_bits_for(bench.table, bench.spec.bits, resolved, act_bits=a)
        widths_of = JointActs(ACT_BITS, baseline_bits=a) if joint_table else FixedActs(a)
        solution, check = bench.check_against_uniform(
            solution, table_cost, uniform_w, widths_of, preset
        )
        widths = bench.site_widths(solution, widths_of)
        module = bench.quantize(bench.plan(solution.bits, {}))
        metric = bench.evaluate(module, quantizers(acts.assign(widths, preset)))[primary]
        kept = check is not None and check.kept == "uniform"
        return metric, solution.bits, widths, " (uniform kept)" if kept else ""

    @functools.cache
    def joint(preset: str, match: str) -> tuple[float, dict[str, int], int | dict[str, int], str]:
        """The joint W/A plan at the size and BOPs of uniform `match` with `preset`'s
        quantizers, as a job returns it (see `checked`)."""
        budget = parse_budget(f"match={match}")
        joint_acts = JointActs(ACT_BITS, baseline_bits=budget.match[1])
        joint_cost = acts.joint_cost(cost, bench.spec.bits, errors, joint_acts, preset)
        resolved = budget.resolve(bench.table)
        solution = solve(bench.table, bench.spec.bits, joint_cost, resolved, acts=joint_acts)
        return checked(solution, joint_cost, match, preset, joint_table=True)

    lines += [
        "",
        f"| budget ({method}, auto quantizers) | uniform | mixed weights, fixed A "
        "| joint W/A | joint avg weight bits | joint activation widths (sites) |",
        "|---|---|---|---|---|---|",
    ]
    for match in MATCHED:
        budget = parse_budget(f"match={match}")
        act_bits = budget.match[1]
        resolved = budget.resolve(bench.table)
        fixed_acts = quantizers(acts.assign(act_bits, "auto"))
        uniform_w = uniform_bits_for(bench.table, bench.spec.bits, resolved, act_bits=act_bits)
        uniform = bench.evaluate(bench.quantize(bench.uniform_plan(uniform_w)), fixed_acts)
        fixed = solve(bench.table, bench.spec.bits, cost, resolved, acts=FixedActs(act_bits))
        mixed, _bits, _widths, mixed_kept = checked(fixed, cost, match, "auto", joint_table=False)
        joint_metric, joint_bits, widths, joint_kept = joint("auto", match)
        counts = ", ".join(
            f"A{a}: {list(widths.values()).count(a)}" for a in sorted(set(widths.values()))
        )
        lines.append(
            f"| match={match} | {uniform[primary]:.2f} (W{uniform_w}A{act_bits}) | "
            f"{mixed:.2f}{mixed_kept} | {joint_metric:.2f}{joint_kept} | "
            f"{avg_bits(bench, joint_bits):.2f} | {counts} |"
        )
    lines += [
        "",
        f"Joint W/A at the size and BOPs of uniform W4A4, each preset's quantizers on both sides "
        f"({method}):",
        "",
        "| quantizers | uniform W4A4 | joint W/A | gain |",
        "|---|---|---|---|",
    ]
    for preset in presets:
        metric, _bits, _widths, kept = joint(preset, "W4A4")
        base = uniform_wa[4, 4, preset]
        gain = metric - base if HIGHER_IS_BETTER[primary] else base - metric
        lines.append(f"| {preset} | {base:.2f} | {metric:.2f}{kept} | {gain:+.2f} |")
    lines += [
        "",
        "`auto`, per width and role: held-out divergence from FP32 of each option (all sites at "
        "that width; roles in order, each measured with the earlier ones at their choice):",
        "",
        "| act bits | role | chosen | " + " | ".join(f"{k}" for k in act_options()) + " |",
        "|---|---|---|" + "---|" * len(act_options()),
    ]
    for b, rules in sorted(acts.rules_to_dict().items(), key=lambda item: -int(item[0])):
        for role, measured in rules["divergence"].items():
            cells = " | ".join(f"{measured[k]:.3g}" if k in measured else "" for k in act_options())
            lines.append(f"| {b} | {role} | {rules['chosen'][role]} | {cells} |")
    lines += [
        "",
        "Quantizer `auto` picks per role (sites):",
        "",
    ]
    kinds = act_options()[1:]
    lines += ["| act bits | role | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for a in sorted({a for _, a in UNIFORM_WA}, reverse=True):
        chosen = acts.assign(a, "auto")
        for role in CANDIDATES:
            picked = [
                x.quantizer.kind for x in chosen if x.site.role == role and x.quantizer.bits == a
            ]
            if picked:
                lines.append(
                    f"| {a} | {role} | " + " | ".join(str(picked.count(k)) for k in kinds) + " |"
                )
    lines += ["", f"_{time.perf_counter() - started:.0f} s in all_", ""]
    return "\n".join(lines)
