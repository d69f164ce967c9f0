"""What every model source hands back: the module plus how to feed it and judge it.

A source knows its model family; the rest of bitplan only sees `LoadedModel`, so sensitivity,
quantization and evaluation never branch on where a model came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from allocator.device import device_of, to_device

Inputs = torch.Tensor | dict[str, torch.Tensor]
"""A model-ready batch: an image tensor (N, C, H, W) or a dict of token tensors."""

Task = Literal["classification", "embedding", "causal-lm"]
"""What a model's output is: class logits, one vector per input, or next-token logits."""
LOGIT_TASKS = ("classification", "causal-lm")
"""Tasks whose outputs are logits of a distribution (over classes, or over the next token), so
closeness to FP32 is KL and top-1 agreement rather than a distance."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A model in eval mode with the knowledge needed to run and score it.

    `task` picks the evaluator and the explained quantity for relevance: "classification" models
    return logits, "embedding" models return one vector per input, and "causal-lm" models take
    windows of token ids (`{"input_ids": (N, T)}`) and return the logits of the next token at
    every position (N, T, V). A causal LM reads running text rather than sentences, so it has
    `encode` (text -> token ids, no special tokens) and `context_length` (the longest window its
    positions allow) instead of a sentence `tokenizer`.

    `device` is where the module's weights are (`to` moves them); calling the model moves a
    batch there first, so batches are prepared, kept and keyed on the CPU whatever the device.
    It is read off the module, never stored: a copy made with another module (a quantized
    one, a CPU copy to export or time) runs where its own module is.
    """

    ref: str
    module: nn.Module
    task: Task
    input_kind: Literal["image", "text"]
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tokenizer: Callable[[Sequence[str]], dict[str, torch.Tensor]] | None = None
    output_fn: Callable[[nn.Module, Inputs], torch.Tensor] | None = None
    num_classes: int | None = None
    pinned_layers: tuple[str, ...] = field(default=())
    encode: Callable[[str], list[int]] | None = None
    context_length: int | None = None

    @property
    def device(self) -> torch.device:
        """Where the module's weights are (the CPU for a module without any)."""
        return device_of(self.module)

    def to(self, device: torch.device) -> LoadedModel:
        """Move the module's weights to `device` (in place, as `nn.Module.to`); later calls
        run there. Quantized copies made from the module (`allocator.apply`) stay there too."""
        self.module.to(device)
        return self

    def inputs(self, batch: Inputs) -> Inputs:
        """`batch` on the model's device: for code that reads a batch beside the model's
        outputs (labels of a causal LM's loss), which must then be on the same device."""
        return to_device(batch, self.device)

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        inputs = self.inputs(inputs)
        if self.output_fn is not None:
            return self.output_fn(self.module, inputs)
        return self.module(inputs)

    def prepare_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC RGB -> normalised float NCHW at the model's resolution."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def prepare_text(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise TypeError(f"{self.ref} takes {self.input_kind} inputs, not sentences")
        return self.tokenizer(list(sentences))

    def prepare_windows(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        """Token id windows (N, T) -> the causal LM's batch; windows are never padded."""
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(windows)).long()}


def run_hooked(model: LoadedModel, inputs: Inputs, handles: Sequence[RemovableHandle]) -> None:
    """One forward pass without gradients that exists for what the hooks behind `handles`
    record; the hooks are removed afterwards, also when the pass fails."""
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
