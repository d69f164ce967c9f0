"""Paired comparisons: is the mixed plan better than the uniform plan of the same size, or is the
difference within what the choice of evaluation samples alone would move?

Both plans are scored on the same samples, so each sample's difficulty cancels out of their
difference when both sides are resampled together: a paired bootstrap draws `resamples` sets of
n sample indices with replacement (seeded, so a job's interval is reproducible), computes the
metric of both sides on each set, and takes the central `confidence` share of the resampled
differences as the interval. The verdict (`allocator.job_metrics.verdict`) says "better" or
"worse" only when that interval on the primary metric excludes 0, in the direction
`HIGHER_IS_BETTER` gives, and "no measurable difference" otherwise.

Per-sample values, as `allocator.data.evaluate.per_sample` returns them, by metric:

- `top1`, `agreement`: the share of the sample's predictions that are right (that match FP32's),
  0 or 1 for an image, the share of positions for a causal LM's window; the metric is their mean
  in points.
- `perplexity`: each window's mean next-token negative log-likelihood in nats; the metric is exp
  of their mean (every window predicts as many tokens), recomputed on each resample.
- `spearman`: each sentence pair's cosine similarity; the metric is Spearman x100 between those
  and the pairs' gold scores, recomputed on each resample of pairs for both sides.
- `mse`, `kl`: each sample's value; the metric is their mean.

Works on numpy arrays and imports numpy and scipy only (the `allocator.data` package around it
loads torch); what it returns, `Comparison`, is a torch-free type of `allocator.job_metrics`,
which is what front ends read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from scipy.stats import rankdata

from allocator.job_metrics import HIGHER_IS_BETTER, Comparison, Difference

BOOTSTRAP_RESAMPLES = 2_000
"""Resamples per interval: the 2.5th and 97.5th percentiles of 2,000 differences move by a few
hundredths of a point between seeds, well below any difference worth reporting."""
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
CLOSENESS_METRICS = ("agreement", "mse")
"""Closeness to FP32 a comparison reports besides the primary metric, the first both sides have:
agreement for classifiers and causal LMs, MSE for embeddings (an STS job's agreement does not
exist: its outputs are embeddings, not classes)."""
PERCENT_METRICS = frozenset({"top1", "agreement"})
CHUNK_VALUES = 1 << 22
"""Resampled values held at once (32 MiB of float64): resamples are drawn in chunks of rows."""

Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(per-sample values, index rows (R, n)) -> the metric on each row of indices (R,)."""


def compare(
    primary: str,
    mixed: Mapping[str, np.ndarray],
    uniform: Mapping[str, np.ndarray],
    gold: np.ndarray | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Mixed minus uniform on `primary` and on closeness to FP32, from both sides' per-sample
    values by metric (`per_sample`); `gold` is the pairs' gold scores when `primary` is
    spearman."""
    closeness = next(
        (m for m in CLOSENESS_METRICS if m != primary and m in mixed and m in uniform), None
    )

    def difference(metric: str) -> Difference:
        return paired_difference(
            metric,
            mixed[metric],
            uniform[metric],
            gold,
            resamples=resamples,
            seed=seed,
            confidence=confidence,
        )

    return Comparison(
        primary=difference(primary),
        closeness=None if closeness is None else difference(closeness),
        samples=len(mixed[primary]),
        resamples=resamples,
        confidence=confidence,
    )


def paired_difference(
    metric: str,
    mixed: np.ndarray,
    uniform: np.ndarray,
    gold: np.ndarray | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Difference:
    """`metric` of `mixed` minus that of `uniform` on every sample, with the paired bootstrap
    interval: both sides (and `gold`) are resampled on the same sample indices."""
    mixed, uniform = np.asarray(mixed, dtype=np.float64), np.asarray(uniform, dtype=np.float64)
    if mixed.shape != uniform.shape or mixed.ndim != 1 or len(mixed) == 0:
        raise ValueError(
            f"paired values must be two equally long non-empty vectors, got {mixed.shape} "
            f"and {uniform.shape}"
        )
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(
            f"need resamples >= 1 and 0 < confidence < 1, got {resamples}, {confidence}"
        )
    statistic = metric_statistic(metric, gold, len(mixed))
    count = len(mixed)
    whole = np.arange(count)[None]
    value = float((statistic(mixed, whole) - statistic(uniform, whole))[0])
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK_VALUES // count)
    differences = []
    for start in range(0, resamples, rows):
        picks = rng.integers(0, count, (min(rows, resamples - start), count))
        differences.append(statistic(mixed, picks) - statistic(uniform, picks))
    tail = round((1 - confidence) * 50, 12)  # percent in each tail: 2.5, not 2.5000000000000022
    low, high = np.nanpercentile(np.concatenate(differences), [tail, 100 - tail])
    return Difference(metric, value, float(low), float(high))


def metric_statistic(metric: str, gold: np.ndarray | None, count: int) -> Statistic:
    """How `metric` is computed from per-sample values, on each row of sample indices."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(HIGHER_IS_BETTER)}")
    if metric == "perplexity":
        return lambda values, picks: np.exp(values[picks].mean(axis=1))
    if metric == "spearman":
        if gold is None or len(gold) != count:
            raise ValueError("spearman needs the gold score of every pair (`gold`)")
        scores = np.asarray(gold, dtype=np.float64)
        return lambda values, picks: spearman_rows(values[picks], scores[picks]) * 100
    scale = 100.0 if metric in PERCENT_METRICS else 1.0
    return lambda values, picks: values[picks].mean(axis=1) * scale


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between each row of `a` and the same row of `b` (ties get their average
    rank, as in scipy's spearmanr); NaN for a row where either side is constant."""
    ranks_a, ranks_b = (rankdata(x, axis=1) for x in (a, b))
    ranks_a -= ranks_a.mean(axis=1, keepdims=True)
    ranks_b -= ranks_b.mean(axis=1, keepdims=True)
    norms = np.sqrt((ranks_a**2).sum(axis=1) * (ranks_b**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ranks_a * ranks_b).sum(axis=1) / norms
