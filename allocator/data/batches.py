"""Datasets -> model-ready batches, for calibration and for evaluation alike.

The model prepares its own inputs (resize and normalise images, tokenize text), so a dataset
never needs to know which model it feeds; this module only picks samples, checks the dataset
suits the model, and cuts batches. Calibration draws a seeded random sample so that a profile is
reproducible from (model, data, seed).

A causal LM's samples are windows of a token stream: the text is tokenized piece by piece (so
no call sees more than `ENCODE_CHARS` characters) and cut into consecutive windows of
`window_length` tokens. The stream is bounded (`MAX_CORPUS_TOKENS`) whatever the file's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from allocator.data.readers import Dataset, ImageSet, SentencePairs, TextCorpus
from allocator.errors import BadDataset
from allocator.zoo.base import Inputs, LoadedModel

Samples = np.ndarray | Sequence[str]
"""Raw inputs of one kind: uint8 NHWC images, sentences, or int64 token windows (N, T)."""

WINDOW_TOKENS = 128
"""Tokens per window of a causal LM's text, unless its positions allow fewer: long enough for
the attention to see context, short enough that a calibration batch stays small."""
ENCODE_CHARS = 1 << 20
"""Characters handed to the tokenizer at once: whole lines, so no word is split."""
MAX_CORPUS_TOKENS = 1 << 25
"""Tokens read from one text: about 260,000 windows of 128, far more than calibration or an
evaluation needs, and 256 MiB as int64."""

ACCEPTS: dict[str, tuple[type, ...]] = {
    "image": (ImageSet,),
    "text": (SentencePairs, TextCorpus),
    "causal-lm": (TextCorpus,),
}
"""What each kind of model reads: other text models read a .txt a line per sentence."""
ADVICE = {
    "image": "give an .npz of images",
    "text": "give a .csv/.tsv of sentence pairs or a .txt with one text per line",
    "causal-lm": "give a .txt of UTF-8 text",
}
HOLDS = {ImageSet: "images", SentencePairs: "sentence pairs", TextCorpus: "text"}


def model_kind(model: LoadedModel) -> str:
    """ "causal-lm" for causal LMs, else the model's input kind."""
    return "causal-lm" if model.task == "causal-lm" else model.input_kind


def check_compatible(dataset: Dataset, model: LoadedModel) -> None:
    """Refuse a dataset the model cannot read (images for a text model, sentence pairs for a
    causal LM, ...), before any work."""
    kind = model_kind(model)
    if not isinstance(dataset, ACCEPTS[kind]):
        takes = "running text" if kind == "causal-lm" else f"{model.input_kind} inputs"
        raise BadDataset(
            f"{model.ref} takes {takes} but the dataset holds {HOLDS[type(dataset)]}; "
            f"{ADVICE[kind]}"
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
    samples = pool(dataset, model)
    return prepare_batches(
        model, take(samples, _calibration_indices(len(samples), n, seed)), batch_size
    )


def holdout_batches(
    dataset: Dataset, model: LoadedModel, n: int, batch_size: int, seed: int = 0
) -> list[Inputs]:
    """Up to `n` samples the calibration draw of the same (n, seed) did not pick, for choices
    that must be judged on data they were not fitted to; empty when the dataset has no others."""
    samples = pool(dataset, model)
    rest = np.setdiff1d(np.arange(len(samples)), _calibration_indices(len(samples), n, seed))
    rng = np.random.default_rng(seed + 1)
    picked = rng.choice(rest, size=min(n, len(rest)), replace=False)
    return prepare_batches(model, take(samples, np.sort(picked)), batch_size) if len(picked) else []


def _calibration_indices(size: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(size, size=min(n, size), replace=False)


def pool(dataset: Dataset, model: LoadedModel) -> Samples:
    """Every input the dataset holds for `model`, labels and scores left out."""
    if isinstance(dataset, SentencePairs):
        return [*dataset.a, *dataset.b]
    if isinstance(dataset, TextCorpus):
        if model.task == "causal-lm":
            return token_windows(dataset, model)
        return [line for line in dataset.lines if line.strip()]
    return dataset.images


def window_length(model: LoadedModel) -> int:
    """Tokens per window for a causal LM: `WINDOW_TOKENS`, or fewer if its positions end sooner."""
    return min(WINDOW_TOKENS, model.context_length or WINDOW_TOKENS)


def token_windows(corpus: TextCorpus, model: LoadedModel) -> np.ndarray:
    """The text as consecutive windows (N, T) of token ids; the last partial window is dropped,
    unless the whole text is shorter than one window, which then is the only window."""
    if model.encode is None:
        raise TypeError(f"{model.ref} has no encode function: only causal LMs read token windows")
    stream = _stream(corpus.lines, model.encode, model.ref)
    if len(stream) < 2:
        raise BadDataset(
            f"the text is {len(stream)} token(s) long for {model.ref}; a causal LM needs at "
            "least two to predict one, give more text"
        )
    length = min(window_length(model), len(stream))
    count = len(stream) // length
    return stream[: count * length].reshape(count, length)


def _stream(lines: Sequence[str], encode: Callable[[str], list[int]], ref: str) -> np.ndarray:
    """The whole text's token ids, refused once past `MAX_CORPUS_TOKENS`."""
    pieces = []
    total = 0
    for text in _pieces(lines):
        ids = np.asarray(encode(text), dtype=np.int64)
        total += len(ids)
        if total > MAX_CORPUS_TOKENS:
            raise BadDataset(
                f"the text is over {MAX_CORPUS_TOKENS} tokens long for {ref}; "
                "send a shorter file, a few thousand windows are plenty"
            )
        pieces.append(ids)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _pieces(lines: Sequence[str]) -> Iterator[str]:
    """The text, line ends restored, in runs of whole lines of about `ENCODE_CHARS`."""
    run: list[str] = []
    size = 0
    for line in lines:
        run.append(line + "\n")
        size += len(line) + 1
        if size >= ENCODE_CHARS:
            yield "".join(run)
            run, size = [], 0
    if run:
        yield "".join(run)


def take(samples: Samples, indices: Sequence[int] | np.ndarray) -> Samples:
    if isinstance(samples, np.ndarray):
        return samples[np.asarray(indices)]
    return [samples[i] for i in indices]


def prepare_batches(model: LoadedModel, samples: Samples, batch_size: int) -> list[Inputs]:
    kind = model_kind(model)
    prepare = {
        "image": model.prepare_images,
        "text": model.prepare_text,
        "causal-lm": model.prepare_windows,
    }[kind]
    return [prepare(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
