"""The TorchScript exporter's view of a bitplan model, and a runtime's view of the result.

The tracer feeds positional tensors, so a model taking a dict of token tensors is wrapped
(`Traced`) and its inputs named in a fixed order; ONNX Runtime is fed by those same names
(`feeds`). The exporter knows opsets up to `TRACE_OPSET`; the latency tables trace their FP32
models here too, so they time the graph an export starts from.

Imports torch and numpy.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from allocator.zoo.base import Inputs, LoadedModel

TRACE_OPSET = 20
"""The highest opset the TorchScript exporter emits; the export raises it afterwards."""
OUTPUT_NAME = "output"
IMAGE_INPUT = "input"


class Traced(nn.Module):
    """The model as a function of positional tensors, which is what the tracer feeds."""

    def __init__(self, model: LoadedModel, names: tuple[str, ...]) -> None:
        super().__init__()
        self.module = model.module
        self._model = model
        self._names = names

    def forward(self, *tensors: Tensor) -> Tensor:
        if self._names == (IMAGE_INPUT,):
            return self._model(tensors[0])
        return self._model(dict(zip(self._names, tensors, strict=True)))


def positional_inputs(batch: Inputs) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
    """A model-ready batch as (ONNX input names, the tensors `Traced` takes in that order)."""
    if isinstance(batch, Tensor):
        return (IMAGE_INPUT,), (batch,)
    names = tuple(sorted(batch))
    return names, tuple(batch[n] for n in names)


def dynamic_axes(names: Sequence[str], tensors: Sequence[Tensor]) -> dict[str, dict[int, str]]:
    """Batch (and, for token inputs, sequence) axes left open, so any batch runs."""
    axes = {}
    for name, tensor in zip(names, tensors, strict=True):
        axes[name] = {0: "batch"} if name == IMAGE_INPUT else {0: "batch", 1: "sequence"}
        if tensor.dim() < 2:
            axes[name] = {0: "batch"}
    axes[OUTPUT_NAME] = {0: "batch"}
    return axes


def trace(
    wrapper: nn.Module,
    tensors: tuple[Tensor, ...],
    names: Sequence[str],
    path: Path,
    **options: Any,
) -> None:
    """`wrapper` traced on `tensors` into `path` by the TorchScript exporter at `TRACE_OPSET`,
    one way for the export and the FP32 models the latency tables time; `options` (dynamic
    axes, the marker opset) go to `torch.onnx.export`."""
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            wrapper,
            tensors,
            str(path),
            dynamo=False,
            opset_version=TRACE_OPSET,
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            **options,
        )


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The TorchScript exporter warns that it is legacy and that custom ops lack shapes; both
    are known here and would only fill a job's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def replace_module(model: LoadedModel, module: nn.Module) -> LoadedModel:
    """`model` running `module` instead of its own (same inputs, same output function)."""
    return dataclasses.replace(model, module=module)


def feeds(names: Sequence[str], batch: Inputs) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed for one model-ready batch, by the exported input names."""
    if isinstance(batch, Tensor):
        return {names[0]: batch.detach().cpu().numpy()}
    return {name: batch[name].detach().cpu().numpy() for name in names}


def unused_layers(
    wrapper: nn.Module,
    tensors: tuple[Tensor, ...],
    layers: Mapping[str, nn.Module],
    names: list[str],
) -> list[str]:
    """Those of `names` whose output the model's outputs never depend on (a BERT pooler that a
    sentence embedding runs and drops): shifting their output leaves the outputs bit-equal.
    The tracer prunes such layers, so their weights are legitimately absent from the graph."""
    with torch.no_grad():
        reference = wrapper(*tensors)
        unused = []
        for name in names:
            handle = layers[name].register_forward_hook(lambda _m, _a, out: out + 1.0)
            try:
                shifted = wrapper(*tensors)
            finally:
                handle.remove()
            if torch.equal(shifted, reference):
                unused.append(name)
    return unused
