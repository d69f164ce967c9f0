"""Typed errors a user can act on.

Every front end maps these once: the CLI to a one-line message and a non-zero exit, the service to
an HTTP 4xx. Raise them from `allocator/` instead of ValueError so the message reaches the user
unchanged and nothing further up has to guess what went wrong.
"""

from __future__ import annotations


class BitplanError(Exception):
    """Base class: the message says what to change."""


class UnknownModel(BitplanError):
    """A model reference no registered source understands."""


class WeightsMismatch(BitplanError):
    """Weights whose keys or shapes do not fit the architecture."""


class UnsafeWeights(BitplanError):
    """A weights file that would need code to unpickle."""


class BadDataset(BitplanError):
    """A dataset file that is corrupt, empty or wrongly shaped."""


class BadSpec(BitplanError):
    """A job option outside its bounds (a width, a sample count, a time limit)."""


class BadReference(BitplanError):
    """A job names an upload the tenant does not own, or a server path it may not read."""


class BadBudget(BitplanError):
    """A budget string that cannot be parsed."""


class InfeasibleBudget(BitplanError):
    """A budget below the smallest size any allocation reaches."""

    def __init__(self, message: str, smallest_feasible_bits: float) -> None:
        super().__init__(message)
        self.smallest_feasible_bits = smallest_feasible_bits


class UnsupportedModel(BitplanError):
    """A model with no layer bitplan can quantize."""


class UnknownMethod(BitplanError):
    """A sensitivity method or quantizer name that is not registered."""


class DeviceUnavailable(BitplanError):
    """A job asks for a device this machine does not have (CUDA on a CPU-only worker, a GPU
    index past the last one): the same on every attempt, so the job fails at once."""


class JobCancelled(BitplanError):
    """Raised between phases or layers when the job's cancel flag is set."""


class ExportRefused(BitplanError):
    """A plan or artifact a runtime format cannot express (a log2 activation quantizer in ONNX
    QDQ), or an artifact that does not match the plan it is exported with."""


class ParityFailed(BitplanError):
    """An exported model whose outputs in its runtime differ from bitplan's quantized model by
    more than the tolerance; the message names the first layer where they diverge."""
