"""Datasets for calibration and evaluation: read a file, cut model-ready batches, score outputs.

`load_dataset` reads a file into an `ImageSet`, `SentencePairs` or `TextCorpus`;
`calibration_batches` draws a seeded sample the model has prepared; `EvalSet` + `evaluate` score
any function of the inputs (the FP32 model or a quantized variant). Never imports a model source
beyond `zoo.base`.
"""

from allocator.data.batches import calibration_batches, check_compatible, holdout_batches
from allocator.data.evaluate import EvalSet, evaluate
from allocator.data.readers import Dataset, ImageSet, SentencePairs, TextCorpus, load_dataset
from allocator.job_metrics import HIGHER_IS_BETTER

__all__ = [
    "HIGHER_IS_BETTER",
    "Dataset",
    "EvalSet",
    "ImageSet",
    "SentencePairs",
    "TextCorpus",
    "calibration_batches",
    "check_compatible",
    "evaluate",
    "holdout_batches",
    "load_dataset",
]
