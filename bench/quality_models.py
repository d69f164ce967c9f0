"""The models of bench/quality.py: each one's job, the data it is measured on, and how its table
reads; with the one-time preparation some need (the ImageNet split, the example's model source).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_digits_vit import MODEL_REF as DIGITS_REF  # noqa: E402
from train_tiny_lm import OUT as TINY_LM  # noqa: E402

from allocator.pipeline import JobSpec, Workbench  # noqa: E402
from allocator.zoo import register_source  # noqa: E402

DATA = Path(os.environ.get("BITPLAN_SHARED_DATA", ROOT.parent / "shared" / "data"))
METHODS = ("lrp", "fisher", "hessian", "measured", "lrp+fisher")
DIGITS = ROOT / "bench" / "out" / "digits"
IMAGENET = DATA / "imagenet-sample" / "dev500_224.npz"
IMAGENET_SPLIT = ROOT / "bench" / "out" / "imagenet-split"
IMAGENET_CALIB_IMAGES = 256
SPLIT_SEED = 0
CIFAR_CALIB_SAMPLES = 1024
EXAMPLE_SOURCE = ROOT / "examples" / "bitplan-efficientnet-lite"


@dataclass(frozen=True)
class BenchModel:
    """A model of this bench: its job, the methods it runs by default, the metrics its table
    shows (the primary one when empty), a line saying which data it is measured on, and whether
    mixed is compared with uniform image by image (for evaluation sets too small to trust a
    difference of two top-1 figures)."""

    spec: JobSpec
    methods: tuple[str, ...] = METHODS
    metrics: tuple[str, ...] = ()
    note: str = ""
    paired: bool = False


def model_specs(eval_samples: int | None) -> dict[str, BenchModel]:
    cifar = DATA / "cifar10"
    stsb = DATA / "stsb"
    common = {"eval_samples": eval_samples}
    specs = {
        "digits": JobSpec(
            model=DIGITS_REF,
            weights=str(DIGITS / "vit.safetensors"),
            calib=str(DIGITS / "train.npz"),
            eval=str(DIGITS / "test.npz"),
            calib_samples=256,
            **common,
        ),
        "resnet20": JobSpec(
            model="zoo:cifar_resnet20",
            weights=str(cifar / "resnet20-12fca82f.th"),
            calib=str(cifar / "calib_train_jpeg.npz"),
            eval=str(cifar / "test_jpeg.npz"),
            **common,
        ),
        "resnet56": JobSpec(
            model="zoo:cifar_resnet56",
            weights=str(cifar / "resnet56-4bfd9763.th"),
            calib=str(cifar / "calib_train_jpeg.npz"),
            eval=str(cifar / "test_jpeg.npz"),
            **common,
        ),
        "minilm": JobSpec(
            model="hf:minilm",
            calib=str(stsb / "sts-train.csv"),
            eval=str(stsb / "sts-dev.csv"),
            **common,
        ),
    }
    models = {name: BenchModel(spec) for name, spec in specs.items()}
    for name in ("resnet20", "resnet56"):
        models[name] = BenchModel(
            # 1,024 of the 2,000 calibration images fit (the other 976 check plans): in-network
            # fits gain from more images than a job's default (docs/design.md has the figures).
            replace(specs[name], calib_samples=CIFAR_CALIB_SAMPLES),
            metrics=("top1", "agreement", "kl"),
            paired=True,
        )
    models["effnetlite1"] = BenchModel(
        JobSpec(
            model="effnetlite:lite1",
            calib=str(IMAGENET_SPLIT / "calib.npz"),
            eval=str(IMAGENET_SPLIT / "eval.npz"),
            calib_samples=IMAGENET_CALIB_IMAGES // 2,
            batch_size=32,
            # Each round measures two held-out passes per layer: 130 passes of 128 images at
            # 240 px, about an hour a round on this CPU. One solve, checked against uniform.
            context_rounds=0,
            **common,
        ),
        # `measured` costs one calibration pass per layer and width: hours on this model.
        methods=tuple(m for m in METHODS if m != "measured"),
        metrics=("top1", "agreement", "kl"),
        paired=True,
        note=(
            f"dev500_224.npz split by a permutation with seed {SPLIT_SEED}: its first "
            f"{IMAGENET_CALIB_IMAGES} images calibrate ({IMAGENET_CALIB_IMAGES // 2} for the "
            f"statistics, the others held out for the rule and plan checks), the other "
            f"{500 - IMAGENET_CALIB_IMAGES} evaluate (one image is "
            f"{100 / (500 - IMAGENET_CALIB_IMAGES):.2f} top-1 points)."
        ),
    )
    models["tinylm"] = BenchModel(
        JobSpec(
            model=f"hf:{TINY_LM / 'model'}",
            calib=str(TINY_LM / "train.txt"),
            eval=str(TINY_LM / "dev.txt"),
            **common,
        ),
        # Every row scores vocabulary-wide logits at every position: the cheaper methods keep
        # the whole model within minutes.
        methods=("lrp", "fisher", "lrp+fisher"),
        metrics=("perplexity", "agreement", "kl"),
        paired=True,
        note=(
            "Llama-style causal LM trained by bench/train_tiny_lm.py on the STS-B training "
            "sentences; calibrated on windows of those sentences (train.txt), evaluated on the "
            "dev sentences (dev.txt), cut into consecutive windows of 128 tokens. Perplexity: "
            "lower is better; agreement and KL with FP32 per predicted position."
        ),
    )
    return models


def split_imagenet(folder: Path) -> None:
    """The shared ImageNet sample as calibration and evaluation files a job can name: one image
    per class leaves no spare images, so the two sets are disjoint halves of a fixed shuffle."""
    with np.load(IMAGENET) as data:
        images, labels = data["images"], data["labels"]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    folder.mkdir(parents=True, exist_ok=True)
    for name, picked in (
        ("calib", order[:IMAGENET_CALIB_IMAGES]),
        ("eval", order[IMAGENET_CALIB_IMAGES:]),
    ):
        np.savez(folder / f"{name}.npz", images=images[picked], labels=labels[picked])


def register_example_source() -> None:
    """The `effnetlite:` source of examples/, registered as its entry point would register it
    once installed: the bench extra brings its dependencies, not the example itself."""
    sys.path.insert(0, str(EXAMPLE_SOURCE))
    example = importlib.import_module("bitplan_efficientnet_lite")
    register_source(example.PREFIX)(example.load)


def avg_bits(bench: Workbench, bits: dict[str, int]) -> float:
    return sum(layer.params * bits[layer.name] for layer in bench.table) / bench.table.total_params
