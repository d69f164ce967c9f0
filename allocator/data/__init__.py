"""Datasets for calibration and evaluation: read a file, cut model-ready batches, score outputs.

`load_dataset` reads a file into an `ImageSet`, `SentencePairs` or `TextCorpus`;
`split_for_eval` holds out part of a calibration file for a job given no evaluation file
(`eval_source` says which case a job is in); `calibration_batches` draws a seeded sample the
model has prepared; `EvalSet` + `evaluate` score any function of the inputs (the FP32 model or a
quantized variant), and `per_sample` + `compare.compare` set two models side by side, sample by
sample, with paired bootstrap intervals. Never imports a model source beyond `zoo.base`.
"""

from allocator.data.batches import (
    calibration_batches,
    check_compatible,
    holdout_batches,
    split_for_eval,
)
from allocator.data.evaluate import (
    DEFAULT_BATCH_SIZE,
    EvalSet,
    evaluate,
    evaluate_outputs,
    per_sample,
)
from allocator.data.readers import (
    Dataset,
    ImageSet,
    SentencePairs,
    TextCorpus,
    eval_source,
    load_dataset,
)
from allocator.job_metrics import HIGHER_IS_BETTER

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "HIGHER_IS_BETTER",
    "Dataset",
    "EvalSet",
    "ImageSet",
    "SentencePairs",
    "TextCorpus",
    "calibration_batches",
    "check_compatible",
    "eval_source",
    "evaluate",
    "evaluate_outputs",
    "holdout_batches",
    "load_dataset",
    "per_sample",
    "split_for_eval",
]
