"""Dataset files -> validated in-memory datasets, with one-line errors for every bad file.

Datasets are uploads as often as they are benchmarks, so every check that a later phase would
otherwise trip over (dtype, shape, label count, unreadable rows) is made once, here, and reported
as `BadDataset` naming the file and what to change. The dataclasses validate themselves, so a
dataset built in memory gets the same checks as one read from disk.

Files come from tenants, so nothing is read into memory before its size is known and bounded: an
.npz is judged from its zip directory and each array's .npy header (shape, dtype) before any array
is decompressed, and a text file line by line with a bound on every line.

Never imports torch or a model source: reading data must not depend on any model.
"""

from __future__ import annotations

import csv
import filecmp
import itertools
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from allocator.errors import BadDataset
from allocator.limits import Limits

MIB = 1 << 20

STS_FIELDS = 7
"""STS-B rows: genre, file, year, id, score, sentence 1, sentence 2 (extra fields ignored)."""
STS_SCORE, STS_FIRST, STS_SECOND = 4, 5, 6

IMAGE_SUFFIXES = (".npz",)
PAIR_SUFFIXES = (".csv", ".tsv")
TEXT_SUFFIXES = (".txt",)

BOMB_RATIO = 100
"""Decompressed bytes per compressed byte above which an archive is a bomb, not a dataset.
Photographs compress about 1:1 and even flat synthetic images stay far below this, while deflate
reaches about 1000:1 on zeros: capping the ratio makes a sender pay at least 1% of what the
server would have to hold."""
BOMB_FLOOR = 16 * MIB
"""Archives declaring less than this are never refused for their ratio: a small file of zeros
or sorted labels costs nothing worth refusing, and tests and toy sets are made of such files."""
ARCHIVE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
"""The zip methods np.savez and np.savez_compressed write. zipfile bounds deflate's output per
read; other methods (bzip2, lzma) may expand a few compressed bytes into a huge block at once."""
MAX_PAIR_LINES = 1_000_000
"""Lines in one sentence-pair file: STS-B's largest split has under 6,000; a million is far more
than any calibration or evaluation needs and bounds the time spent parsing."""
MAX_TEXT_LINES = 1_000_000
"""Lines in one text file: WikiText-103's training split has under 2 million, its test split
under 5,000; calibration and evaluation need a few thousand windows, not a library."""
MAX_LINE_CHARS = 64 * 1024
"""Characters in one line, its end included: a sentence pair is a few hundred characters, a
paragraph of running text a few thousand, and a file without line ends must not be read whole
into one string."""
UNREADABLE_NPZ = "not a readable .npz archive; save it with np.savez(path, images=..., labels=...)"
UNREADABLE_ERRORS = (
    OSError,
    ValueError,  # numpy's header and array parsing
    EOFError,
    RuntimeError,  # zipfile on an encrypted member
    zipfile.BadZipFile,
    zlib.error,  # a damaged deflate stream
)
"""What a damaged archive raises; their text is numpy's and zipfile's, not advice for a user
(numpy's suggests allow_pickle), so `UNREADABLE_NPZ` replaces it."""


class DatasetTooLarge(BadDataset):
    """A dataset declaring more decompressed bytes than the operator allows (`max_dataset_bytes`)."""


@dataclass(frozen=True)
class ImageSet:
    """RGB images (N, H, W, 3) uint8, with class labels (N,) when known."""

    images: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        _check_images(images.dtype, images.shape)
        if labels is None:
            return
        _check_labels(labels.dtype, labels.shape, len(images))
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


@dataclass(frozen=True)
class TextCorpus:
    """Running text, one line per entry (line ends removed), for causal LMs: cut into token
    windows by the model's tokenizer (`allocator.data.batches`), or read a line per sentence by
    other text models."""

    lines: Sequence[str]

    def __post_init__(self) -> None:
        if not any(line.strip() for line in self.lines):
            raise BadDataset("the text file holds no text; give UTF-8 text, one paragraph a line")

    def __len__(self) -> int:
        return len(self.lines)


Dataset = ImageSet | SentencePairs | TextCorpus


def _check_images(dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Shared by `ImageSet` and the .npz header check, so a file is refused before it is read
    with the message an in-memory set would get."""
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise BadDataset(f"images are {dtype} {shape}, expected uint8 (N, H, W, 3) RGB")
    if shape[0] == 0:
        raise BadDataset("the dataset holds no images; give at least one")


def _check_labels(dtype: np.dtype, shape: tuple[int, ...], count: int) -> None:
    if not np.issubdtype(dtype, np.integer) or len(shape) != 1:
        raise BadDataset(f"labels are {dtype} {shape}, expected integers of shape (N,)")
    if shape[0] != count:
        raise BadDataset(f"{shape[0]} labels for {count} images; give one label per image")


def load_dataset(
    path: str | os.PathLike[str], *, max_bytes: int = Limits.max_dataset_bytes
) -> Dataset:
    """Read a dataset file, choosing the reader by extension; `max_bytes` bounds what reading it
    may allocate (the operator's `Limits.max_dataset_bytes`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    read = READERS.get(suffix)
    if read is None:
        raise BadDataset(
            f"{path}: unknown dataset type {suffix or '(no extension)'!r}; give an .npz of "
            "images, an STS-B style .csv/.tsv of sentence pairs or a .txt of UTF-8 text"
        )
    if not path.is_file():
        raise BadDataset(f"dataset file {path} does not exist; pass an existing file")
    try:
        return read(path, max_bytes=max_bytes)
    except BadDataset as exc:
        raise type(exc)(f"{path}: {exc}") from None


def eval_source(calib: str | os.PathLike[str], eval: str | os.PathLike[str] | None) -> str:
    """Where a job with these files is evaluated (a key of `EVAL_SOURCES`): "holdout" (no
    evaluation file: `split_for_eval` holds out part of the calibration data), "calibration"
    (the evaluation file is the calibration file, by path or by content: the job asked for it,
    as `bitplan run --eval-on-calibration` does), or "eval"."""
    if eval is None:
        return "holdout"
    calib_path, eval_path = Path(calib), Path(eval)
    if calib_path == eval_path:
        return "calibration"
    if calib_path.is_file() and eval_path.is_file() and filecmp.cmp(calib_path, eval_path, False):
        return "calibration"
    return "eval"


@dataclass(frozen=True)
class _Member:
    """One .npy array of an archive as its header declares it, before any of it is read."""

    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]


def read_npz(path: Path, *, max_bytes: int = Limits.max_dataset_bytes) -> ImageSet:
    """`images` (N, H, W, 3) uint8 and optional `labels` (N,) integers.

    Everything that decides how much memory reading takes is checked first, from the zip
    directory and the .npy headers: numpy allocates an array as large as its header declares
    before reading a byte of it, so a header is trusted only once it matches the size the zip
    will actually decompress, and that size only once it is within `max_bytes`.
    """
    try:
        with _open_archive(path) as archive:
            _check_archive(archive.infolist(), max_bytes)
            members = {
                info.filename.removesuffix(".npy"): _read_header(archive, info)
                for info in archive.infolist()
            }
            if "images" not in members:
                raise BadDataset(
                    f"has arrays {sorted(members)} but no 'images'; save with "
                    "np.savez(path, images=..., labels=...)"
                )
            images = members["images"]
            _check_images(images.dtype, images.shape)
            labels = members.get("labels")
            if labels is not None:
                _check_labels(labels.dtype, labels.shape, images.shape[0])
            return ImageSet(
                _read_array(archive, images),
                None if labels is None else _read_array(archive, labels),
            )
    except UNREADABLE_ERRORS:
        raise BadDataset(UNREADABLE_NPZ) from None


def _open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with path.open("rb") as handle:
            if handle.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX:
                raise BadDataset(
                    "holds a single array (np.save), expected an .npz archive with 'images'; "
                    "save it with np.savez(path, images=..., labels=...)"
                ) from None
        raise


def _check_archive(infos: list[zipfile.ZipInfo], max_bytes: int) -> None:
    """Judged from the zip directory alone; zipfile never decompresses a member past the size
    declared there, so these sizes bound what reading can allocate."""
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise DatasetTooLarge(
            f"declares {declared} bytes decompressed, above the dataset limit of {max_bytes} "
            "bytes (max_dataset_bytes, BITPLAN_MAX_DATASET_BYTES on a server); "
            "send fewer or smaller images"
        )
    compressed = sum(info.compress_size for info in infos)
    if declared > BOMB_FLOOR and declared > BOMB_RATIO * compressed:
        raise BadDataset(
            f"declares {declared} bytes decompressed from {compressed} compressed, more than "
            f"the {BOMB_RATIO}:1 compression ratio allowed above {BOMB_FLOOR} bytes; "
            "send the real images, saved with np.savez or np.savez_compressed"
        )
    for info in infos:
        if info.compress_type not in ARCHIVE_METHODS:
            raise BadDataset(
                f"member {info.filename!r} uses zip compression method {info.compress_type}, "
                f"only {' and '.join(ARCHIVE_METHODS.values())} are read; "
                "save the archive with np.savez or np.savez_compressed"
            )


def _read_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Member:
    """Reads only the member's .npy header, and refuses one whose array would not fill exactly
    the bytes the zip declares for it."""
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise BadDataset(
                f"array {info.filename!r} uses .npy format version {version}; "
                "save uint8 images and integer labels with np.savez"
            )
        header_size = stream.tell()
    if dtype.hasobject:
        raise BadDataset(
            f"array {info.filename!r} holds Python objects ({dtype}); "
            "save plain numeric arrays: uint8 images and integer labels"
        )
    implied = header_size + math.prod(shape) * dtype.itemsize
    if any(dim < 0 for dim in shape) or info.file_size != implied:
        raise BadDataset(
            f"array {info.filename!r} declares {dtype} {shape} in {info.file_size} bytes, "
            "which do not match; the archive is damaged, save it again with np.savez"
        )
    return _Member(info, dtype, shape)


def _read_array(archive: zipfile.ZipFile, member: _Member) -> np.ndarray:
    with archive.open(member.info) as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def read_sentence_pairs(path: Path, *, max_bytes: int = Limits.max_dataset_bytes) -> SentencePairs:
    """STS-B format: tab-separated, unquoted; score in field 5, sentences in fields 6 and 7."""
    _check_size(path, max_bytes, "send fewer pairs")
    first: list[str] = []
    second: list[str] = []
    scores: list[float] = []
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            lines = _bounded_lines(handle, MAX_PAIR_LINES, "sentence pair")
            rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
            for row in rows:
                if not row:
                    continue
                scores.append(_score(row, rows.line_num))
                first.append(row[STS_FIRST])
                second.append(row[STS_SECOND])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadDataset(f"not a UTF-8 tab-separated file ({exc})") from None
    return SentencePairs(first, second, np.asarray(scores, dtype=np.float64))


def read_text(path: Path, *, max_bytes: int = Limits.max_dataset_bytes) -> TextCorpus:
    """UTF-8 text, kept line by line; every line and the line count are bounded."""
    _check_size(path, max_bytes, "send less text")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            lines = [
                line.rstrip("\r\n") for line in _bounded_lines(handle, MAX_TEXT_LINES, "paragraph")
            ]
    except UnicodeDecodeError as exc:
        raise BadDataset(f"not UTF-8 text ({exc}); save the file as UTF-8") from None
    return TextCorpus(lines)


def _check_size(path: Path, max_bytes: int, advice: str) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise DatasetTooLarge(
            f"is {size} bytes, above the dataset limit of {max_bytes} bytes "
            f"(max_dataset_bytes, BITPLAN_MAX_DATASET_BYTES on a server); {advice}"
        )


def _bounded_lines(handle: IO[str], max_lines: int, unit: str) -> Iterator[str]:
    """Lines each read with a bound, so a file without line ends is refused after
    `MAX_LINE_CHARS` characters instead of being read whole; `unit` is what a line holds."""
    for number in itertools.count(1):
        line = handle.readline(MAX_LINE_CHARS + 1)
        if not line:
            return
        if len(line) > MAX_LINE_CHARS:
            raise BadDataset(
                f"line {number} is longer than {MAX_LINE_CHARS} characters; "
                f"give one {unit} per line"
            )
        if number > max_lines:
            raise BadDataset(
                f"line {number} is past the limit of {max_lines} lines; send fewer {unit}s"
            )
        yield line


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


READERS = {
    **dict.fromkeys(IMAGE_SUFFIXES, read_npz),
    **dict.fromkeys(PAIR_SUFFIXES, read_sentence_pairs),
    **dict.fromkeys(TEXT_SUFFIXES, read_text),
}
"""The reader of each file suffix."""
DATASET_SUFFIXES = tuple(READERS)
