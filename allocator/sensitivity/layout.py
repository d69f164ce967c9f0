"""Convolutions on channels-first (NCHW) tensors while a backward pass takes parameter gradients.

oneDNN's AVX2 kernel for the weight gradient of a 1x1, stride-2 convolution with 2 to 7 input
channels (`jit_avx2_1x1_convolution_bwd_weights_t`, torch 2.14 / oneDNN 3.12) writes past its
buffers when the input or the weight is channels-last (NHWC) and the batch holds more than one
sample: the process dies in `free()` (SIGABRT) or with SIGSEGV. It runs on CPUs with AVX2 but
no AVX-512, or where `ONEDNN_MAX_CPU_ISA=AVX2`. A bias gradient takes the same kernel. Image
batches decoded from HWC pixels are channels-last views, channels-last inputs keep every
convolution after them channels-last, and FastViT's stem has exactly such a convolution (the
MobileOne scale branch, 3 -> 48 channels, 1x1, stride 2).

The steps that ask for parameter gradients (Hutchinson, the LRP conservation check) run under
`channels_first_convolutions`: each convolution's input is made contiguous before it runs, and a
channels-last weight is given contiguous storage until the context ends. Values are unchanged;
only the memory layout the kernels see is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def channels_first(t: torch.Tensor) -> torch.Tensor | None:
    """`t` with the strides of a default (NCHW) tensor, or None when it has them already.

    `is_contiguous()` is no test: a 1x1 kernel (out, in, 1, 1) in channels-last strides counts
    as contiguous too, and oneDNN still takes it for channels-last."""
    if t.stride() == _contiguous_strides(t.shape):
        return None
    return t.clone(memory_format=torch.contiguous_format)


def _channels_first_input(_module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    copy = None if x is None else channels_first(x)
    return None if copy is None else (copy, *args[1:])


@contextmanager
def channels_first_convolutions(module: nn.Module) -> Iterator[None]:
    """Every convolution in `module` reads and weighs channels-first tensors inside the context;
    hooks and weight layouts are as before once it ends, also on an error."""
    convolutions = [child for child in module.modules() if isinstance(child, CONVOLUTIONS)]
    handles = [conv.register_forward_pre_hook(_channels_first_input) for conv in convolutions]
    restore: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for conv in convolutions:
            weight = conv.weight
            copy = channels_first(weight.data) if isinstance(weight, nn.Parameter) else None
            if copy is not None:
                restore.append((weight, weight.data))
                weight.data = copy
        yield
    finally:
        for handle in handles:
            handle.remove()
        for weight, data in restore:
            weight.data = data
