"""The coverage matrix: does a whole small job run on every common model family?

A platform team brings its own model first; this says, family by family, which steps of a job
work. Each family's model is built with random weights (no hub here) at its native resolution
(`--tiny`: a shrunken config at a small resolution, what the CI subset in tests/test_coverage.py
runs) and goes through:

    layers     the layer table: quantizable layers and their share of the parameters; the
               layers that stay float, with why, are counted
    statistics input statistics and the clipping/rounding choice per (layer, width) (GPTQ)
    lrp-cons   LRP conservation: relevance at the input plus what biases absorb against the
               explained quantity (ok below 5 % relative error)
    lrp, fisher, hessian, measured   each sensitivity method's cost table
    solve      the integer program at avg-bits=6 over widths 4 and 8
    pack       the mixed model packed and rebuilt with `load_packed` into a fresh model of the
               same architecture: outputs equal the quantized model's
    W/A        activation sites found and the mixed model run with every site at 8 bits

A step that fails shows its error's first line; the steps that need it show "-". Each family
runs in a child process, so one that exhausts memory or crashes cannot take the matrix with it.

Run: `.venv/bin/python bench/coverage.py [--tiny] [--families resnet,vit]`; the table also goes
to bench/out/coverage[-tiny].md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue as queue_module
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from allocator.activation_bench import quantizers  # noqa: E402
from allocator.activations import quantized_activations  # noqa: E402
from allocator.apply import load_packed, pack  # noqa: E402
from allocator.budget import parse_budget  # noqa: E402
from allocator.pipeline import JobSpec, Workbench, prepare  # noqa: E402
from allocator.plan import BitPlan  # noqa: E402
from allocator.sensitivity.lrp import conservation  # noqa: E402
from allocator.solve import solve  # noqa: E402
from allocator.zoo import load_model  # noqa: E402
from allocator.zoo.base import Inputs, LoadedModel  # noqa: E402

OUT = REPO_ROOT / "bench" / "out"
STEPS = (
    "layers",
    "statistics",
    "lrp-cons",
    "lrp",
    "fisher",
    "hessian",
    "measured",
    "solve",
    "pack",
    "W/A",
)
METHODS = ("lrp", "fisher", "hessian", "measured")
BITS = (4, 8)
BUDGET = "avg-bits=6"
CONSERVATION_TOLERANCE = 0.05
FAMILY_SECONDS = 1800


@dataclass(frozen=True)
class Family:
    """`ref` at native resolution; `tiny` shrunk for the CI subset (same code paths). A
    Hugging Face family (`hf` names it in `bench.tiny_hf`) is a small config saved into a folder
    at run time, in both modes: no hub here, and no pretrained weights of these families."""

    name: str
    ref: str
    tiny: str
    hf: str | None = None


def _timm(
    name: str,
    architecture: str,
    tiny_options: str,
    native_options: str = "",
    tiny_architecture: str | None = None,
) -> Family:
    """A timm family; its tiny row may use timm's own test-sized model of the family."""
    native = f"timm:{architecture}" + (f"?{native_options}" if native_options else "")
    return Family(name, native, f"timm:{tiny_architecture or architecture}?{tiny_options}")


IMAGE_FAMILIES: tuple[Family, ...] = (
    _timm(
        "resnet",
        "resnet18",
        "num_classes=10&zero_init_last=false&input_size=64",
        native_options="zero_init_last=false",
        tiny_architecture="test_resnet",
    ),
    _timm("resnext", "resnext26ts", "num_classes=10&input_size=64"),
    _timm("regnet", "regnetx_002", "num_classes=10&input_size=64"),
    _timm("mobilenetv2", "mobilenetv2_050", "num_classes=10&input_size=64"),
    _timm("mobilenetv3", "mobilenetv3_small_050", "num_classes=10&input_size=64"),
    _timm(
        "efficientnet",
        "efficientnet_b0",
        "num_classes=10&input_size=64",
        tiny_architecture="test_efficientnet",
    ),
    _timm(
        "efficientnet-lite (Conv2dSame)", "tf_efficientnet_lite0", "num_classes=10&input_size=64"
    ),
    _timm("ghostnet", "ghostnet_050", "num_classes=10&input_size=64"),
    _timm(
        "convnext",
        "convnext_atto",
        "num_classes=10&input_size=64",
        tiny_architecture="test_convnext",
    ),
    _timm("repvit", "repvit_m0_9", "num_classes=10&input_size=64"),
    _timm("fastvit", "fastvit_t8", "num_classes=10&input_size=64"),
    # EfficientFormer's attention biases are fixed at 7x7 tokens: 224 pixels, even when tiny.
    _timm(
        "efficientformer",
        "efficientformer_l1",
        "num_classes=10&depths=1,1,1,2&embed_dims=16,24,32,48&input_size=224",
    ),
    _timm("levit", "levit_128s", "num_classes=10&img_size=64"),
    _timm("poolformer", "poolformerv2_s12", "num_classes=10&input_size=64"),
    _timm("mobilevit", "mobilevit_xxs", "num_classes=10&input_size=64"),
    _timm("mixer", "mixer_s16_224", "img_size=32&num_classes=10"),
    _timm("deit", "deit_tiny_patch16_224", "img_size=32&patch_size=8&depth=2&num_classes=10"),
    _timm(
        "vit",
        "vit_tiny_patch16_224",
        "img_size=32&patch_size=8&depth=2&embed_dim=48&num_heads=3&num_classes=10",
    ),
    _timm(
        "swin",
        "swin_tiny_patch4_window7_224",
        "img_size=56&embed_dim=24&depths=1,1,2,1&num_heads=1,1,2,2&num_classes=10",
    ),
    _timm(
        "beit",
        "beitv2_base_patch16_224",
        "img_size=32&patch_size=8&depth=2&embed_dim=48&num_heads=3&num_classes=10",
    ),
    _timm(
        "eva",
        "eva02_tiny_patch14_224",
        "img_size=28&patch_size=7&depth=2&embed_dim=48&num_heads=3&num_classes=10",
    ),
)
HF_FAMILIES: tuple[Family, ...] = tuple(
    Family(f"hf {name}", f"hf:<{name} folder>", f"hf:<{name} folder>", hf=name)
    for name in ("bert", "distilbert", "roberta", "vit", "gpt2", "llama")
)
FAMILIES: dict[str, Family] = {family.name: family for family in IMAGE_FAMILIES + HF_FAMILIES}


@dataclass
class Coverage:
    family: str
    ref: str
    layers: int | None = None
    float_layers: int | None = None
    quantized_share: float | None = None
    steps: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def green(self) -> bool:
        return all(self.steps.get(step) == "ok" for step in STEPS)


def cover(family: Family, *, tiny: bool, folder: Path, images: int) -> Coverage:
    """Run every step on one family; a failing step records its error and stops the steps
    that depend on it."""
    ref = family.tiny if tiny else family.ref
    result = Coverage(family.name, ref)
    started = time.perf_counter()
    torch.manual_seed(0)
    try:
        _run_steps(result, *_materialise(family, ref, folder, images), folder, images)
    except Exception as error:  # building the model or its data: the whole row fails
        result.steps.setdefault("layers", _first_line(error))
    result.seconds = time.perf_counter() - started
    return result


def _materialise(family: Family, ref: str, folder: Path, images: int) -> tuple[str, Path]:
    """The model reference to load and a calibration file it reads."""
    if family.hf is None:
        return ref, _images(folder, load_model(ref).image_size, images)
    from bench.tiny_hf import build_folder, data_for

    model_folder = build_folder(family.hf, folder / family.hf)
    return f"hf:{model_folder}", data_for(family.hf, folder)


def _run_steps(result: Coverage, ref: str, calib: Path, folder: Path, images: int) -> None:
    def step(name: str, action: Callable[[], str | None]) -> bool:
        try:
            note = action()
        except Exception as error:  # the matrix reports every failure, whatever its type
            result.steps[name] = _first_line(error)
            return False
        result.steps[name] = note or "ok"
        return note is None

    spec = JobSpec(
        model=ref,
        calib=str(calib),
        budget=BUDGET,
        bits=BITS,
        calib_samples=images,
        batch_size=images,
        act_bits=8,
        report=False,
        report_widths=False,
    )
    bench = None

    def statistics() -> None:
        nonlocal bench
        bench = prepare(spec)
        table = bench.table
        result.layers = len(table)
        result.float_layers = len(getattr(table, "floating", ()))
        total = sum(p.numel() for p in bench.model.module.parameters())
        result.quantized_share = table.total_params / total

    if not step("statistics", statistics):
        result.steps["layers"] = result.steps["statistics"]
        return
    assert bench is not None
    result.steps["layers"] = "ok"
    step("lrp-cons", lambda: _conservation(bench.model, bench.batches[0]))
    tables = {}

    def method(name: str) -> None:
        tables[name] = bench.cost_table(name)[0]

    for name in METHODS:
        step(name, lambda name=name: method(name))
    if not tables:
        return
    cost = next(iter(tables.values()))
    budget = parse_budget(BUDGET)
    plan = None

    def solved() -> None:
        nonlocal plan
        solution = solve(bench.table, BITS, cost, budget.resolve(bench.table))
        plan = bench.plan(solution.bits, {"model": ref, "budget": BUDGET})

    if not step("solve", solved):
        return
    mixed = bench.quantize(plan)
    step("pack", lambda: _pack_round_trip(bench, mixed, plan, folder))
    step("W/A", lambda: _activations(bench, mixed))


def _conservation(model: LoadedModel, inputs: Inputs) -> str | None:
    check = conservation(model, inputs)
    if check.relative_error < CONSERVATION_TOLERANCE:
        return None
    return f"off by {check.relative_error:.0%}"


def _pack_round_trip(bench: Workbench, mixed: nn.Module, plan: BitPlan, folder: Path) -> str | None:
    path = folder / "packed.safetensors"
    pack(mixed, plan, path)
    rebuilt, _ = load_packed(path, load_model(bench.spec.model).module)
    inputs = bench.batches[0]
    with torch.no_grad():
        ours = replace(bench.model, module=mixed)(inputs)
        theirs = replace(bench.model, module=rebuilt.eval())(inputs)
    difference = (theirs - ours).abs().max().item()
    return None if difference <= 1e-5 else f"outputs differ by {difference:.2g}"


def _activations(bench: Workbench, mixed: nn.Module) -> str | None:
    acts = bench.activations
    if acts is None or not acts.sites:
        return "no activation sites found"
    chosen = quantizers(acts.assign(8, "auto"))
    with torch.no_grad(), quantized_activations(mixed, acts.sites, chosen):
        out = replace(bench.model, module=mixed)(bench.batches[0])
    return None if torch.isfinite(out).all() else "non-finite outputs at W/A 8"


def _images(folder: Path, size: int, count: int) -> Path:
    rng = np.random.default_rng(0)
    path = folder / f"images-{size}.npz"
    np.savez(
        path,
        images=rng.integers(0, 256, (count * 3, size, size, 3), dtype=np.uint8),
        labels=rng.integers(0, 10, count * 3),
    )
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


# --- running the matrix ------------------------------------------------------------------------


def _cover_in_child(family: Family, tiny: bool, images: int, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bitplan-coverage-") as folder:
        queue.put(cover(family, tiny=tiny, folder=Path(folder), images=images))


def _wait_for_row(
    queue: multiprocessing.Queue, child: multiprocessing.process.BaseProcess, deadline: float
) -> Coverage:
    """The child's row, polled so that a child killed by a native crash (no row will come) is
    noticed at once instead of at the deadline."""
    while time.perf_counter() < deadline:
        try:
            return queue.get(timeout=min(5.0, max(0.0, deadline - time.perf_counter())))
        except queue_module.Empty:
            if not child.is_alive():
                return queue.get(timeout=1)
    raise queue_module.Empty


def run_isolated(family: Family, *, tiny: bool, images: int) -> Coverage:
    """`cover` in a child process, bounded in time; a crash or a timeout is a row too."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_cover_in_child, args=(family, tiny, images, queue))
    started = time.perf_counter()
    child.start()
    try:
        return _wait_for_row(queue, child, started + FAMILY_SECONDS)
    except queue_module.Empty:
        crashed = Coverage(family.name, family.tiny if tiny else family.ref)
        reason = (
            f"timed out after {FAMILY_SECONDS} s"
            if child.is_alive()
            else f"the process died (exit code {child.exitcode})"
        )
        crashed.steps["layers"] = reason
        crashed.seconds = time.perf_counter() - started
        return crashed
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


def markdown(rows: list[Coverage], tiny: bool, images: int) -> str:
    kind = "tiny configs" if tiny else "native resolution, random init"
    green = sum(row.green for row in rows)
    lines = [
        f"#### Coverage ({kind}; {images} calibration images; widths {BITS}; {BUDGET})",
        "",
        "| family | model | layers | float layers | quantized params | "
        + " | ".join(STEPS)
        + " | seconds |",
        "|---|---|---:|---:|---:|" + "---|" * len(STEPS) + "---:|",
    ]
    for row in rows:
        share = "" if row.quantized_share is None else f"{row.quantized_share:.1%}"
        cells = [row.steps.get(step, "-").replace("|", "\\|") for step in STEPS]
        lines.append(
            f"| {row.family} | `{row.ref}` | {row.layers if row.layers is not None else ''} | "
            f"{row.float_layers if row.float_layers is not None else ''} | {share} | "
            + " | ".join(cells)
            + f" | {row.seconds:.0f} |"
        )
    lines += ["", f"{green} of {len(rows)} families green on every step."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="shrunken configs (the CI subset)")
    parser.add_argument("--families", help="comma-separated family names; default all")
    parser.add_argument("--images", type=int, default=4, help="calibration images")
    args = parser.parse_args()
    names = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    rows = []
    for name in names:
        row = run_isolated(FAMILIES[name], tiny=args.tiny, images=args.images)
        print(
            f"{name}: {'green' if row.green else row.steps} ({row.seconds:.0f} s)", file=sys.stderr
        )
        rows.append(row)
    table = markdown(rows, args.tiny, args.images)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"coverage{'-tiny' if args.tiny else ''}.md").write_text(table + "\n")
    return 0 if all(row.green for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
