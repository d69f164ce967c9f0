"""Dataset files -> validated in-memory datasets, with one-line errors for every bad file.

Datasets are uploads as often as they are benchmarks, so every check that a later phase would
otherwise trip over (dtype, shape, label count, unreadable rows) is made once, here, and reported
as `BadDataset` naming the file and what to change. The dataclasses validate themselves, so a
dataset built in memory gets the same checks as one read from disk.

Never imports torch or a model source: reading data must not depend on any model.
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allocator.errors import BadDataset

STS_FIELDS = 7
"""STS-B rows: genre, file, year, id, score, sentence 1, sentence 2 (extra fields ignored)."""
STS_SCORE, STS_FIRST, STS_SECOND = 4, 5, 6

IMAGE_SUFFIXES = (".npz",)
PAIR_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class ImageSet:
    """RGB images (N, H, W, 3) uint8, with class labels (N,) when known."""

    images: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise BadDataset(
                f"images are {images.dtype} {images.shape}, expected uint8 (N, H, W, 3) RGB"
            )
        if len(images) == 0:
            raise BadDataset("the dataset holds no images; give at least one")
        if labels is None:
            return
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
            raise BadDataset(
                f"labels are {labels.dtype} {labels.shape}, expected integers of shape (N,)"
            )
        if len(labels) != len(images):
            raise BadDataset(
                f"{len(labels)} labels for {len(images)} images; give one label per image"
            )
        if labels.min() < 0:
            raise BadDataset("labels include negative values; use class indices 0..C-1")

    def __len__(self) -> int:
        return len(self.images)

    def head(self, limit: int) -> ImageSet:
        labels = None if self.labels is None else self.labels[:limit]
        return ImageSet(self.images[:limit], labels)


@dataclass(frozen=True)
class SentencePairs:
    """Sentence pairs with a gold similarity score each (STS-B: 0..5)."""

    a: Sequence[str]
    b: Sequence[str]
    scores: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.a) == len(self.b) == len(self.scores):
            raise BadDataset(
                f"{len(self.a)} first sentences, {len(self.b)} second sentences and "
                f"{len(self.scores)} scores; give one score per pair"
            )
        if len(self.a) == 0:
            raise BadDataset("the dataset holds no sentence pairs; give at least one")
        if self.scores.ndim != 1 or not np.isfinite(self.scores).all():
            raise BadDataset("scores must be one finite number per pair")

    def __len__(self) -> int:
        return len(self.a)

    def head(self, limit: int) -> SentencePairs:
        return SentencePairs(self.a[:limit], self.b[:limit], self.scores[:limit])


Dataset = ImageSet | SentencePairs


def load_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Read a dataset file, choosing the reader by extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES + PAIR_SUFFIXES:
        raise BadDataset(
            f"{path}: unknown dataset type {suffix or '(no extension)'!r}; "
            "give an .npz of images or an STS-B style .csv/.tsv of sentence pairs"
        )
    if not path.is_file():
        raise BadDataset(f"dataset file {path} does not exist; pass an existing file")
    try:
        return read_npz(path) if suffix in IMAGE_SUFFIXES else read_sentence_pairs(path)
    except BadDataset as exc:
        raise BadDataset(f"{path}: {exc}") from None


def read_npz(path: Path) -> ImageSet:
    """`images` (N, H, W, 3) uint8 and optional `labels` (N,) integers."""
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise BadDataset("holds a single array, expected an .npz archive with 'images'")
        with archive:
            if "images" not in archive.files:
                raise BadDataset(
                    f"has arrays {archive.files} but no 'images'; save with "
                    "np.savez(path, images=..., labels=...)"
                )
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadDataset(f"not a readable .npz archive ({exc}); save it with np.savez") from None
    return ImageSet(images, labels)


def read_sentence_pairs(path: Path) -> SentencePairs:
    """STS-B format: tab-separated, unquoted; score in field 5, sentences in fields 6 and 7."""
    first: list[str] = []
    second: list[str] = []
    scores: list[float] = []
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            for row in rows:
                if not row:
                    continue
                scores.append(_score(row, rows.line_num))
                first.append(row[STS_FIRST])
                second.append(row[STS_SECOND])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadDataset(f"not a UTF-8 tab-separated file ({exc})") from None
    return SentencePairs(first, second, np.asarray(scores, dtype=np.float64))


def _score(row: list[str], line: int) -> float:
    if len(row) < STS_FIELDS:
        raise BadDataset(
            f"line {line} has {len(row)} tab-separated fields, expected at least {STS_FIELDS} "
            "(genre, file, year, id, score, sentence 1, sentence 2)"
        )
    try:
        score = float(row[STS_SCORE])
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise BadDataset(
            f"line {line} has score {row[STS_SCORE]!r} in field {STS_SCORE + 1}, expected a number"
        )
    return score
