"""Datasets -> model-ready batches, for calibration and for evaluation alike.

The model prepares its own inputs (resize and normalise images, tokenize text), so a dataset
never needs to know which model it feeds; this module only picks samples, checks the dataset
suits the model, and cuts batches. Calibration draws a seeded random sample so that a profile is
reproducible from (model, data, seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from allocator.data.readers import Dataset, ImageSet, SentencePairs
from allocator.errors import BadDataset
from allocator.zoo.base import Inputs, LoadedModel

Samples = np.ndarray | Sequence[str]
"""Raw inputs of one kind: uint8 NHWC images or sentences."""


def check_compatible(dataset: Dataset, model: LoadedModel) -> None:
    """Refuse images for a text model and sentences for an image model, before any work."""
    holds = "image" if isinstance(dataset, ImageSet) else "text"
    if model.input_kind != holds:
        wanted = "an .npz of images" if model.input_kind == "image" else "a .csv/.tsv of sentences"
        raise BadDataset(
            f"{model.ref} takes {model.input_kind} inputs but the dataset holds {holds}; "
            f"give {wanted}"
        )


def calibration_batches(
    dataset: Dataset, model: LoadedModel, n: int, batch_size: int, seed: int = 0
) -> list[Inputs]:
    """`n` samples drawn at random with `seed` (all of them if the dataset is smaller).

    Sentence pairs contribute sentences from both columns: calibration needs inputs, not pairs.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    check_compatible(dataset, model)
    samples = pool(dataset)
    return prepare_batches(
        model, take(samples, _calibration_indices(len(samples), n, seed)), batch_size
    )


def holdout_batches(
    dataset: Dataset, model: LoadedModel, n: int, batch_size: int, seed: int = 0
) -> list[Inputs]:
    """Up to `n` samples the calibration draw of the same (n, seed) did not pick, for choices
    that must be judged on data they were not fitted to; empty when the dataset has no others."""
    samples = pool(dataset)
    rest = np.setdiff1d(np.arange(len(samples)), _calibration_indices(len(samples), n, seed))
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(rest, size=min(n, len(rest)), replace=False)
    return prepare_batches(model, take(samples, np.sort(picked)), batch_size) if len(picked) else []


def _calibration_indices(size: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(size, size=min(n, size), replace=False)


def pool(dataset: Dataset) -> Samples:
    """Every input the dataset holds, labels and scores left out."""
    if isinstance(dataset, SentencePairs):
        return [*dataset.a, *dataset.b]
    return dataset.images


def take(samples: Samples, indices: Sequence[int] | np.ndarray) -> Samples:
    if isinstance(samples, np.ndarray):
        return samples[np.asarray(indices)]
    return [samples[i] for i in indices]


def prepare_batches(model: LoadedModel, samples: Samples, batch_size: int) -> list[Inputs]:
    prepare = model.prepare_images if isinstance(samples, np.ndarray) else model.prepare_text
    return [prepare(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
