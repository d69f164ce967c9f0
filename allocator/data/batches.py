"""Datasets -> model-ready batches, for calibration and for evaluation alike.

The model prepares its own inputs (resize and normalise images, tokenize text), so a dataset
never needs to know which model it feeds; this module only picks samples, checks the dataset
suits the model, and cuts batches. Calibration draws a seeded random sample so that a profile is
reproducible from (model, data, seed). A job given no evaluation data first splits its
calibration data (`split_for_eval`), so what it is scored on was never drawn for calibration.

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

EVAL_HOLDOUT_SHARE = 0.25
"""Share of the calibration data a job given no evaluation data holds out to evaluate on
(`split_for_eval`): on CIFAR's 2,000 calibration images, 500 to evaluate on and 1,500 left for
the calibration draw and the held-out plan checks (256 each by default)."""
EVAL_HOLDOUT_MAX = 10_000
"""Most images or sentence pairs held out for evaluation: a test set's size (CIFAR-10's), and
every plan a job scores is one pass over them."""
EVAL_HOLDOUT_MAX_CHARS = 200_000
"""Most characters of text held out for evaluation: a few hundred windows of a causal LM,
whose evaluation keeps every position's logits (`EvalSet`)."""
EVAL_SPLIT_STREAM = 13
"""Mixed into the seed of the evaluation split, so it draws independently of calibration."""
NO_HOLDOUT_ADVICE = (
    "give evaluation data (--eval), or evaluate on the calibration data by choice "
    "(--eval-on-calibration)"
)

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


def split_for_eval(
    dataset: Dataset, share: float = EVAL_HOLDOUT_SHARE, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """(calibration part, evaluation part) of a calibration dataset, for a job given no
    evaluation data: the evaluation part is `share` of the images or sentence pairs, drawn with
    `seed` (at most `EVAL_HOLDOUT_MAX`), or the last lines of a text (`share` of its characters,
    at most `EVAL_HOLDOUT_MAX_CHARS`, whole lines, so a causal LM reads it as running text).

    Split before anything is drawn: `calibration_batches` and `holdout_batches` then draw from
    the calibration part only, so no evaluation sample is ever calibrated on or used to choose
    a plan. Raises `BadDataset` when the data is too small to leave something on both sides.
    """
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    if isinstance(dataset, TextCorpus):
        return _split_text(dataset, share)
    size = len(dataset)
    if size < 2:
        unit = HOLDS[type(dataset)].removesuffix("s") if size == 1 else HOLDS[type(dataset)]
        raise BadDataset(
            f"the calibration data holds {size} {unit}: too few to hold out any for evaluation; "
            f"{NO_HOLDOUT_ADVICE}"
        )
    count = min(max(1, int(size * share)), EVAL_HOLDOUT_MAX)
    rng = np.random.default_rng((EVAL_SPLIT_STREAM, seed))
    held = np.zeros(size, dtype=bool)
    held[rng.choice(size, size=count, replace=False)] = True
    return _subset(dataset, ~held), _subset(dataset, held)


def _subset(dataset: ImageSet | SentencePairs, keep: np.ndarray) -> ImageSet | SentencePairs:
    if isinstance(dataset, ImageSet):
        labels = None if dataset.labels is None else dataset.labels[keep]
        return ImageSet(dataset.images[keep], labels)
    indices = np.flatnonzero(keep)
    return SentencePairs(
        [dataset.a[i] for i in indices], [dataset.b[i] for i in indices], dataset.scores[keep]
    )


def _split_text(corpus: TextCorpus, share: float) -> tuple[TextCorpus, TextCorpus]:
    lines = corpus.lines
    sizes = [len(line) + 1 for line in lines]
    target = min(sum(sizes) * share, EVAL_HOLDOUT_MAX_CHARS)
    start, held = len(lines), 0
    while start > 1 and held < target:
        start -= 1
        held += sizes[start]
    calibration, evaluation = lines[:start], lines[start:]
    if not any(line.strip() for line in calibration) or not any(
        line.strip() for line in evaluation
    ):
        raise BadDataset(
            f"the calibration text has {sum(1 for line in lines if line.strip())} line(s) of "
            f"text: too few to hold out any for evaluation; {NO_HOLDOUT_ADVICE}"
        )
    return TextCorpus(calibration), TextCorpus(evaluation)


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
