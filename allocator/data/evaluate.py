"""Scoring a model, or any quantized variant of it, on an evaluation set.

A job scores the FP32 model, the mixed-precision model and a uniform baseline, and some costs
score one variant per layer, so inputs are prepared once (`EvalSet`) and each variant costs one
batched forward pass. Which metric is "the" quality follows from the data and the task:
perplexity for a causal LM on text (its own tokens are the labels), classification top-1 when
labels exist, STS Spearman for sentence pairs and an embedding model, and otherwise closeness to
the FP32 outputs (top-1 agreement and KL for classifiers and causal LMs, per predicted token for
the latter; MSE for embeddings), which needs those outputs as `reference` (get them with
`evalset.outputs(model)`). Perplexity, KL and MSE are lower-is-better: every consumer that
compares metrics reads the direction from `HIGHER_IS_BETTER`.

`evaluate` returns the aggregates; `evaluate_outputs` and `per_sample` read outputs already
computed, so one forward pass also gives each sample's values for a paired comparison of two
models on the same samples (`allocator.data.compare`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.nn import functional as F

from allocator.data.batches import check_compatible, pool, prepare_batches, take
from allocator.data.readers import Dataset, ImageSet, SentencePairs, TextCorpus
from allocator.errors import BadDataset
from allocator.job_metrics import (
    HIGHER_IS_BETTER as HIGHER_IS_BETTER,  # defined with the job metrics
)
from allocator.zoo.base import LOGIT_TASKS, Inputs, LoadedModel

REFERENCE_METRICS = frozenset({"agreement", "kl", "mse"})
"""Metrics that compare with the FP32 outputs and so need `reference`."""

DEFAULT_BATCH_SIZE = 128
FLOAT64_CHUNK = 64
"""Samples scored at once in float64 by KL and perplexity: a causal LM's sample is a window of
vocabulary-wide logits, and a float64 copy of all of them would double the evaluation's memory."""


class EvalSet:
    """The model-ready batches of an evaluation dataset, prepared once and scored many times.

    Sentences are batched sorted by length, so padding stays short; `outputs` returns rows in
    dataset order (for sentence pairs: all first sentences, then all second sentences). A causal
    LM's samples are token windows and `limit` counts windows; its outputs hold the logits of
    every position, windows x tokens x vocabulary floats, so its evaluation text wants to be a
    few hundred windows, not a book.
    """

    def __init__(
        self,
        dataset: Dataset,
        model: LoadedModel,
        batch_size: int = DEFAULT_BATCH_SIZE,
        limit: int | None = None,
    ) -> None:
        check_compatible(dataset, model)
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        if limit is not None and not isinstance(dataset, TextCorpus):
            dataset = dataset.head(limit)
        self.task = model.task
        self.labels: torch.Tensor | None = None
        self.scores: np.ndarray | None = None
        self.tokens: torch.Tensor | None = None
        samples = pool(dataset, model)
        if isinstance(dataset, TextCorpus):
            samples = samples[:limit]
        self.size = len(samples) if isinstance(dataset, TextCorpus) else len(dataset)
        order = np.arange(len(samples))
        if isinstance(samples, list):
            order = np.argsort([len(sentence) for sentence in samples], kind="stable")
        if isinstance(dataset, SentencePairs) and model.task == "embedding":
            self.scores = dataset.scores
        elif (
            isinstance(dataset, ImageSet)
            and dataset.labels is not None
            and model.task == "classification"
        ):
            self.labels = _checked_labels(dataset.labels, model)
        elif model.task == "causal-lm":
            self.tokens = torch.from_numpy(samples)
        self._restore = torch.from_numpy(np.argsort(order))
        self.batches = prepare_batches(model, take(samples, order), batch_size)
        self.primary_metric = _primary_metric(self)

    def __len__(self) -> int:
        return self.size

    def outputs(self, fn: Callable[[Inputs], torch.Tensor]) -> torch.Tensor:
        """`fn` on every batch, float32, in dataset order, on the CPU (each batch's outputs come
        back from the model's device as it ends: metrics, comparisons and the cache read them
        there); with the FP32 model: the reference."""
        with torch.inference_mode():
            out = torch.cat([fn(batch).cpu() for batch in self.batches])
        return out.float()[self._restore]


def evaluate(
    fn: Callable[[Inputs], torch.Tensor],
    evalset: EvalSet,
    reference: torch.Tensor | None = None,
) -> dict[str, float]:
    """Every metric that applies, keyed as in `HIGHER_IS_BETTER`; always includes the primary."""
    _check_reference(evalset, reference)
    return evaluate_outputs(evalset.outputs(fn), evalset, reference)


def evaluate_outputs(
    outputs: torch.Tensor, evalset: EvalSet, reference: torch.Tensor | None = None
) -> dict[str, float]:
    """`evaluate` from outputs already computed (`evalset.outputs(fn)`), so the same pass can
    also give `per_sample` values."""
    _check_reference(evalset, reference, outputs)
    metrics: dict[str, float] = {}
    if evalset.tokens is not None:
        metrics["perplexity"] = perplexity(outputs, evalset.tokens)
    if evalset.labels is not None:
        metrics["top1"] = top1(outputs, evalset.labels)
    if evalset.scores is not None:
        metrics["spearman"] = sts_spearman(outputs, evalset.scores)
    if reference is not None:
        if evalset.task in LOGIT_TASKS:
            metrics["agreement"] = agreement(outputs, reference)
            metrics["kl"] = kl_divergence(reference, outputs)
        else:
            metrics["mse"] = mse(outputs, reference)
    return metrics


def per_sample(
    outputs: torch.Tensor, evalset: EvalSet, reference: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Each sample's share of the metrics a paired comparison reads (`allocator.data.compare`
    says what each holds), one value per image, window or sentence pair (per sentence for MSE),
    in dataset order: perplexity (window NLL), top1, spearman (pair cosine), and agreement or
    MSE with `reference` when given. Two models' values on the same `evalset` pair up."""
    _check_reference(evalset, reference, outputs)
    values: dict[str, np.ndarray] = {}
    if evalset.tokens is not None:
        values["perplexity"] = window_nll(outputs, evalset.tokens)
    if evalset.labels is not None:
        values["top1"] = correct(outputs, evalset.labels)
    if evalset.scores is not None:
        values["spearman"] = pair_cosines(outputs, len(evalset.scores))
    if reference is not None:
        if evalset.task in LOGIT_TASKS:
            values["agreement"] = correct(outputs, reference.argmax(dim=-1))
        else:
            values["mse"] = sample_mse(outputs, reference)
    return values


def _check_reference(
    evalset: EvalSet, reference: torch.Tensor | None, outputs: torch.Tensor | None = None
) -> None:
    if reference is None and evalset.primary_metric in REFERENCE_METRICS:
        raise ValueError(
            f"{evalset.primary_metric} compares with the FP32 model: "
            "pass reference=evalset.outputs(fp32_model)"
        )
    if reference is not None and outputs is not None and reference.shape != outputs.shape:
        raise ValueError(
            f"reference has shape {tuple(reference.shape)} but the outputs have "
            f"{tuple(outputs.shape)}; compute it with evalset.outputs on this evalset"
        )


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy over every window (N, T) of `tokens`: position t
    of a window predicts its token t + 1, so the last position predicts nothing."""
    return math.exp(window_nll(logits, tokens).mean())


def window_nll(logits: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """Each window's mean next-token negative log-likelihood in nats, float64 (N,); every window
    predicts as many tokens, so exp of their mean is the set's perplexity."""
    losses = []
    for chunk in _chunks(len(tokens)):
        log_probs = F.log_softmax(logits[chunk, :-1].double(), dim=-1)
        losses.append(-log_probs.gather(-1, tokens[chunk, 1:, None])[..., 0].mean(dim=1))
    return torch.cat(losses).numpy()


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of samples (of positions, for a causal LM) whose highest logit is the label."""
    return correct(logits, labels).mean().item() * 100


def correct(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per sample, the share of its predictions (1, or a causal LM window's positions) whose
    highest logit is the label, float64 (N,)."""
    right = (logits.argmax(dim=-1) == labels).double()
    return right.reshape(len(right), -1).mean(dim=1).numpy()


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Percentage of samples whose top class matches the reference's top class."""
    return top1(logits, reference.argmax(dim=-1))


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(softmax(reference) || softmax(logits)) in nats over samples (and positions), in
    float64 for small values."""
    total = 0.0
    for chunk in _chunks(len(reference)):
        log_p = F.log_softmax(reference[chunk].double(), dim=-1)
        log_q = F.log_softmax(logits[chunk].double(), dim=-1)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
    return total / (reference.numel() // reference.shape[-1])


def _chunks(size: int) -> list[slice]:
    return [slice(start, start + FLOAT64_CHUNK) for start in range(0, size, FLOAT64_CHUNK)]


def sts_spearman(embeddings: torch.Tensor, scores: np.ndarray) -> float:
    """Spearman x100 between the pairs' cosine similarities and the gold scores.

    `embeddings` holds all first sentences, then all second sentences, as `EvalSet` returns them.
    """
    return float(spearmanr(pair_cosines(embeddings, len(scores)), scores).statistic) * 100


def pair_cosines(embeddings: torch.Tensor, pairs: int) -> np.ndarray:
    """The cosine similarity of each pair (N,), from all first sentences then all second ones."""
    return F.cosine_similarity(embeddings[:pairs], embeddings[pairs:], dim=-1).numpy()


def mse(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    return sample_mse(outputs, reference).mean().item()


def sample_mse(outputs: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Each output row's mean squared difference from the reference, float64 (N,)."""
    squared = (outputs.double() - reference.double()) ** 2
    return squared.reshape(len(squared), -1).mean(dim=1).numpy()


def _checked_labels(labels: np.ndarray, model: LoadedModel) -> torch.Tensor:
    largest = int(labels.max())
    if model.num_classes is not None and largest >= model.num_classes:
        raise BadDataset(
            f"labels go up to {largest} but {model.ref} has {model.num_classes} classes; "
            "use labels 0..C-1 that match the model's head"
        )
    return torch.from_numpy(labels.astype(np.int64))


def _primary_metric(evalset: EvalSet) -> str:
    if evalset.tokens is not None:
        return "perplexity"
    if evalset.labels is not None:
        return "top1"
    if evalset.scores is not None:
        return "spearman"
    return "agreement" if evalset.task in LOGIT_TASKS else "mse"
