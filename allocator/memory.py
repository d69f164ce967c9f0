"""A job's peak memory, estimated before it allocates: parameters, activations, inputs.

A tenant chooses the model, its options, the batch size and the sample counts; together they
decide whether a worker survives the job. The estimate runs one sample through the model with
hooks that only read output sizes, on the meta device where the source can build there (the API,
at submit: no storage is allocated whatever the model's size) or on the loaded model (the
worker, before calibration). It is a bound for refusing hopeless jobs, not a profile: the terms
are the ones that grow with what a tenant controls, each multiplied by how many copies a job
keeps at once.

Never imports the web, database or queue layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from allocator.device import DeviceMemory
from allocator.errors import BadSpec
from allocator.zoo.base import Inputs, LoadedModel

FLOAT_BYTES = 4
PARAM_COPIES = 3
"""FP32 weights, their gradients (Fisher, LRP) and the quantized model being evaluated; each
candidate width adds one more (the per-width codes `costs.rule_set_choices` keeps)."""
ACTIVATION_COPIES = 3
"""Outputs kept for the backward pass, their gradients, and the relevance pass's copy."""
INPUT_COPIES = 2
"""Calibration and held-out samples, both kept prepared for the whole job."""


class JobTooLarge(BadSpec):
    """A job whose estimated peak memory is above the operator's limit."""


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    activation_bytes_per_sample: int
    input_bytes_per_sample: int
    widths: int
    batch_size: int
    samples: int

    @property
    def param_bytes(self) -> int:
        return self.params * FLOAT_BYTES * (PARAM_COPIES + self.widths)

    @property
    def activation_bytes(self) -> int:
        return self.activation_bytes_per_sample * self.batch_size * ACTIVATION_COPIES

    @property
    def input_bytes(self) -> int:
        return self.input_bytes_per_sample * self.samples * INPUT_COPIES

    @property
    def total(self) -> int:
        return self.param_bytes + self.activation_bytes + self.input_bytes

    def on_device(self, free: int) -> DeviceMemory:
        """The terms as a GPU holds them, beside its `free` bytes (`allocator.device.batch_sizes`):
        the weights and their copies stay there for the whole job; prepared samples stay on
        the CPU and go over one batch at a time, so a sample costs its activations (with their
        gradients and relevance copy while calibrating, once while evaluating) and its input."""
        return DeviceMemory(
            free=free,
            weights=self.param_bytes,
            calibration_per_sample=self.activation_bytes_per_sample * ACTIVATION_COPIES
            + self.input_bytes_per_sample,
            evaluation_per_sample=self.activation_bytes_per_sample + self.input_bytes_per_sample,
        )

    def check(self, limit: int) -> None:
        """Raise `JobTooLarge` naming the largest term and what lowers it."""
        if self.total <= limit:
            return
        raise JobTooLarge(
            f"the job needs about {_gib(self.total)} (weights {_gib(self.param_bytes)} for "
            f"{self.params:,} parameters and {self.widths} widths, activations "
            f"{_gib(self.activation_bytes)} at batch_size {self.batch_size}, inputs "
            f"{_gib(self.input_bytes)} for {self.samples} calibration samples), above this "
            f"server's limit of {_gib(limit)} (BITPLAN_MAX_JOB_MEMORY); lower batch_size or "
            "calib_samples, list fewer bits, or use a smaller model"
        )


def estimate(
    model: LoadedModel, sample: Inputs, *, batch_size: int, samples: int, widths: int
) -> MemoryEstimate:
    """The estimate for a job running `model` on inputs shaped like `sample` (one sample)."""
    return MemoryEstimate(
        params=sum(p.numel() for p in model.module.parameters()),
        activation_bytes_per_sample=_activation_bytes(model, sample),
        input_bytes_per_sample=_nbytes(sample),
        widths=widths,
        batch_size=batch_size,
        samples=samples,
    )


def image_sample(model: LoadedModel) -> torch.Tensor:
    """One input of an image model at its resolution, on its parameters' device."""
    device = next(model.module.parameters()).device
    return torch.zeros(1, 3, model.image_size, model.image_size, device=device)


def _activation_bytes(model: LoadedModel, sample: Inputs) -> int:
    total = [0]

    def count(_module: nn.Module, _args: object, output: object) -> None:
        total[0] += _nbytes(output)

    with _hooked(model.module, count), torch.no_grad():
        model(sample)
    return total[0]


@contextmanager
def _hooked(module: nn.Module, hook: Callable[[nn.Module, object, object], None]) -> Iterator[None]:
    handles = [
        child.register_forward_hook(hook)
        for child in module.modules()
        if next(child.children(), None) is None
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_nbytes(item) for item in value)
    return 0


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.1f} GiB"
