"""Honest comparisons: the paired bootstrap of mixed against uniform, the per-sample values it
reads, and the evaluation part a job without evaluation data holds out of its calibration data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from allocator.data import (
    EvalSet,
    ImageSet,
    SentencePairs,
    TextCorpus,
    calibration_batches,
    eval_source,
    evaluate,
    evaluate_outputs,
    holdout_batches,
    per_sample,
    split_for_eval,
)
from allocator.data.batches import EVAL_HOLDOUT_SHARE
from allocator.data.compare import compare, metric_statistic, paired_difference
from allocator.errors import BadDataset
from allocator.job_metrics import BETTER, NO_DIFFERENCE, WORSE, verdict
from allocator.zoo import LoadedModel
from tests.test_data import image_model, images_brightest_in, sts_model_and_pairs

# --- the paired bootstrap -----------------------------------------------------------------------


def test_a_known_top1_gain_has_an_interval_above_zero_and_is_better() -> None:
    uniform = np.zeros(1000)
    uniform[:700] = 1
    mixed = uniform.copy()
    mixed[700:750] = 1  # 50 more images right, none lost: +5 points

    difference = paired_difference("top1", mixed, uniform)

    assert difference.value == pytest.approx(5.0)
    assert 0 < difference.low < 5.0 < difference.high
    assert verdict("top1", difference.low, difference.high) == BETTER
    assert verdict("top1", -difference.high, -difference.low) == WORSE


def test_identical_sides_give_a_zero_width_interval_and_no_measurable_difference() -> None:
    rng = np.random.default_rng(0)
    correct = (rng.random(300) < 0.8).astype(float)
    nll = rng.random(300) + 1
    cosines, gold = rng.random(300), rng.random(300)
    for primary, values, scores in (
        ("top1", correct, None),
        ("perplexity", nll, None),
        ("spearman", cosines, gold),
    ):
        comparison = compare(primary, {primary: values}, {primary: values.copy()}, scores)
        assert (comparison.primary.value, comparison.primary.low, comparison.primary.high) == (
            0.0,
            0.0,
            0.0,
        )
        assert comparison.verdict == NO_DIFFERENCE


def test_changes_both_ways_within_the_noise_are_no_measurable_difference() -> None:
    uniform = np.zeros(400)
    uniform[:300] = 1
    mixed = uniform.copy()
    mixed[:6] = 0  # six images lost ...
    mixed[300:305] = 1  # ... five gained

    difference = paired_difference("top1", mixed, uniform)

    assert difference.value == pytest.approx(-0.25)
    assert difference.low < 0 < difference.high
    assert verdict("top1", difference.low, difference.high) == NO_DIFFERENCE


def test_perplexity_is_recomputed_on_each_resample_and_lower_is_better() -> None:
    rng = np.random.default_rng(1)
    uniform = rng.random(200) + 2.0
    for mixed, expected in ((uniform - 0.05, BETTER), (uniform + 0.05, WORSE)):
        comparison = compare("perplexity", {"perplexity": mixed}, {"perplexity": uniform})
        assert comparison.primary.value == pytest.approx(
            math.exp(mixed.mean()) - math.exp(uniform.mean())
        )
        assert comparison.verdict == expected
        assert comparison.closeness is None and comparison.samples == 200


def test_spearman_resamples_pairs_on_both_sides_with_their_gold_scores() -> None:
    rng = np.random.default_rng(2)
    gold = rng.random(400) * 5
    mixed = gold + rng.normal(0, 0.5, 400)
    uniform = gold + rng.normal(0, 2.0, 400)

    difference = paired_difference("spearman", mixed, uniform, gold)

    whole = (spearmanr(mixed, gold).statistic - spearmanr(uniform, gold).statistic) * 100
    assert difference.value == pytest.approx(whole)
    assert 0 < difference.low < whole < difference.high
    assert verdict("spearman", difference.low, difference.high) == BETTER
    with pytest.raises(ValueError, match="gold score"):
        paired_difference("spearman", mixed, uniform)


def test_closeness_to_fp32_is_agreement_for_logits_and_mse_for_embeddings() -> None:
    ones, zeros = np.ones(50), np.zeros(50)
    logits = compare("top1", {"top1": ones, "agreement": ones}, {"top1": ones, "agreement": zeros})
    assert logits.closeness is not None and logits.closeness.metric == "agreement"
    assert logits.closeness.value == pytest.approx(100.0)
    gold = np.arange(50.0)
    embeddings = compare(
        "spearman", {"spearman": gold, "mse": zeros}, {"spearman": gold, "mse": ones}, gold
    )
    assert embeddings.closeness is not None and embeddings.closeness.metric == "mse"
    assert embeddings.closeness.value == pytest.approx(-1.0)
    only = compare("agreement", {"agreement": ones}, {"agreement": ones})
    assert only.closeness is None


def test_intervals_are_seeded_and_sides_must_pair_up() -> None:
    rng = np.random.default_rng(3)
    mixed, uniform = rng.random(100) + 1, rng.random(100) + 1
    once = paired_difference("perplexity", mixed, uniform)
    assert once == paired_difference("perplexity", mixed, uniform)
    assert once != paired_difference("perplexity", mixed, uniform, seed=1)
    with pytest.raises(ValueError, match="equally long"):
        paired_difference("top1", mixed, uniform[:-1])
    with pytest.raises(ValueError, match="unknown metric"):
        paired_difference("accuracy", mixed, uniform)


def test_an_interval_that_is_not_a_pair_of_numbers_has_no_verdict() -> None:
    assert verdict("spearman", math.nan, math.nan) == NO_DIFFERENCE


# --- per-sample values --------------------------------------------------------------------------


def aggregate(metric: str, values: np.ndarray, gold: np.ndarray | None = None) -> float:
    """The metric from per-sample values, as the bootstrap computes it on the whole set."""
    return float(
        metric_statistic(metric, gold, len(values))(values, np.arange(len(values))[None])[0]
    )


def test_per_sample_values_add_up_to_the_metrics_of_images() -> None:
    model = image_model()
    dataset = ImageSet(images_brightest_in([0, 1, 2, 1, 2, 0, 0]), np.array([0, 1, 1, 1, 2, 0, 2]))
    evalset = EvalSet(dataset, model, batch_size=3)
    reference = evalset.outputs(model)
    noisy = reference + torch.randn(reference.shape, generator=torch.Generator().manual_seed(0))

    metrics = evaluate_outputs(noisy, evalset, reference)
    values = per_sample(noisy, evalset, reference)

    assert set(values) == {"top1", "agreement"}
    assert all(v.shape == (len(dataset),) for v in values.values())
    for metric in values:
        assert aggregate(metric, values[metric]) == pytest.approx(metrics[metric])
    assert evaluate_outputs(reference, evalset, reference) == evaluate(model, evalset, reference)


def test_per_sample_values_add_up_to_spearman_and_mse_of_sentence_pairs() -> None:
    text, pairs = sts_model_and_pairs([0.5, 4.0, 2.0, 3.5, 1.0, 2.5])
    evalset = EvalSet(pairs, text.model, batch_size=4)
    reference = evalset.outputs(text.model)
    shifted = reference + 0.1 * torch.arange(len(reference))[:, None]

    metrics = evaluate_outputs(shifted, evalset, reference)
    values = per_sample(shifted, evalset, reference)

    assert set(values) == {"spearman", "mse"} and len(values["spearman"]) == len(pairs)
    assert aggregate("spearman", values["spearman"], pairs.scores) == pytest.approx(
        metrics["spearman"]
    )
    assert aggregate("mse", values["mse"]) == pytest.approx(metrics["mse"])


def test_per_sample_values_add_up_to_perplexity_and_agreement_of_a_causal_lm() -> None:
    lm = word_lm()
    evalset = EvalSet(TextCorpus(lines(12)), lm)
    reference = evalset.outputs(lm)
    noisy = reference + torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))

    metrics = evaluate_outputs(noisy, evalset, reference)
    values = per_sample(noisy, evalset, reference)

    assert set(values) == {"perplexity", "agreement"} and len(values["perplexity"]) == len(evalset)
    assert aggregate("perplexity", values["perplexity"]) == pytest.approx(metrics["perplexity"])
    assert aggregate("agreement", values["agreement"]) == pytest.approx(metrics["agreement"])


def test_per_sample_values_need_the_reference_where_the_primary_metric_does() -> None:
    model = image_model(task="classification")
    evalset = EvalSet(ImageSet(images_brightest_in([0, 1])), model)
    with pytest.raises(ValueError, match="compares with the FP32 model"):
        per_sample(evalset.outputs(model), evalset)


# --- the held-out evaluation part ---------------------------------------------------------------


WORDS = 3
"""Words per line of the test text: each word is a token of the word LM, unique in the text."""


def lines(count: int) -> list[str]:
    return [" ".join(f"w{line * WORDS + k}" for k in range(WORDS)) for line in range(count)]


def word_lm(vocabulary: int = 200) -> LoadedModel:
    """A causal LM whose tokens are the words `w<id>`: a window's ids say which lines it read."""
    table = nn.Embedding(vocabulary, vocabulary)  # logits over the words
    torch.nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(0))
    return LoadedModel(
        ref="test:words",
        module=table,
        task="causal-lm",
        input_kind="text",
        output_fn=lambda module, inputs: module(inputs["input_ids"]),
        encode=lambda text: [int(word[1:]) for word in text.split()],
        context_length=4,
    )


def image_ids(batches: list[torch.Tensor]) -> set[int]:
    """Pixel (0, 0) of `images_brightest_in` holds the image's index."""
    return set((torch.cat(batches)[:, 0, 0, 0] * 255).round().int().tolist()) if batches else set()


def test_held_out_images_are_never_drawn_for_calibration_or_plan_checks() -> None:
    model = image_model()
    labels = np.arange(40) % 3
    dataset = ImageSet(images_brightest_in(list(labels)), labels)

    calib, held = split_for_eval(dataset, seed=5)

    assert isinstance(calib, ImageSet) and isinstance(held, ImageSet)
    assert (len(calib), len(held)) == (30, 10) == (40 - 40 * EVAL_HOLDOUT_SHARE, 10)
    evaluated = set(held.images[:, 0, 0, 0].tolist())
    assert evaluated | set(calib.images[:, 0, 0, 0].tolist()) == set(range(40))
    assert held.labels is not None and (held.labels == labels[sorted(evaluated)]).all()
    for n in (8, 15, 40):
        drawn = image_ids(calibration_batches(calib, model, n, 4, seed=5))
        checked = image_ids(holdout_batches(calib, model, n, 4, seed=5))
        assert drawn and not (drawn | checked) & evaluated
    again, _ = split_for_eval(dataset, seed=5)
    other, _ = split_for_eval(dataset, seed=6)
    assert np.array_equal(calib.images, again.images)
    assert not np.array_equal(calib.images, other.images)


def test_held_out_sentence_pairs_are_never_drawn_for_calibration_or_plan_checks() -> None:
    text, pairs = sts_model_and_pairs([float(i % 5) for i in range(20)])

    calib, held = split_for_eval(pairs, share=0.3)

    assert isinstance(calib, SentencePairs) and isinstance(held, SentencePairs)
    assert (len(calib), len(held)) == (14, 6)
    assert sorted([*calib.a, *held.a]) == sorted(pairs.a)
    index = {sentence: i for i, sentence in enumerate(pairs.a)}
    assert all(held.scores[k] == pairs.scores[index[s]] for k, s in enumerate(held.a))
    assert all(held.b[k] == pairs.b[index[s]] for k, s in enumerate(held.a))
    calibration_batches(calib, text.model, 10, 4)
    holdout_batches(calib, text.model, 10, 4)
    assert text.seen and not set(text.seen) & {*held.a, *held.b}


def test_held_out_text_is_the_end_of_the_text_and_never_drawn_for_a_causal_lm() -> None:
    lm = word_lm()
    corpus = TextCorpus(lines(40))

    calib, held = split_for_eval(corpus)

    assert isinstance(calib, TextCorpus) and isinstance(held, TextCorpus)
    assert [*calib.lines, *held.lines] == list(corpus.lines)
    size = [len(line) + 1 for line in corpus.lines]  # line ends count
    held_size = sum(size[len(calib.lines) :])
    assert EVAL_HOLDOUT_SHARE <= held_size / sum(size) < EVAL_HOLDOUT_SHARE + max(size) / sum(size)
    evaluated = {int(word[1:]) for line in held.lines for word in line.split()}
    drawn = torch.cat(
        [
            batch["input_ids"]
            for batch in calibration_batches(calib, lm, 10, 4) + holdout_batches(calib, lm, 10, 4)
        ]
    )
    assert not set(drawn.flatten().tolist()) & evaluated
    assert set(
        torch.cat([b["input_ids"] for b in EvalSet(held, lm).batches]).flatten().tolist()
    ) <= (evaluated)


@pytest.mark.parametrize(
    "dataset",
    [
        ImageSet(images_brightest_in([0])),
        SentencePairs(["a"], ["b"], np.array([1.0])),
        TextCorpus(["only one line of text", "", "  "]),
    ],
    ids=["one image", "one pair", "one line"],
)
def test_data_too_small_to_hold_anything_out_says_what_to_do(dataset) -> None:
    with pytest.raises(BadDataset, match=r"too few to hold out any for evaluation; give .*--eval"):
        split_for_eval(dataset)


def test_the_eval_source_follows_the_files_a_job_names(tmp_path: Path) -> None:
    calib, copy, other = (tmp_path / name for name in ("calib.npz", "copy.npz", "other.npz"))
    calib.write_bytes(b"calibration")
    copy.write_bytes(b"calibration")
    other.write_bytes(b"evaluation!")
    assert eval_source(calib, None) == "holdout"
    assert eval_source(calib, calib) == "calibration"
    assert eval_source(str(calib), str(copy)) == "calibration"
    assert eval_source(calib, other) == "eval"
    assert eval_source("upload:1", "upload:1") == "calibration"
    assert eval_source("upload:1", "upload:2") == "eval"
