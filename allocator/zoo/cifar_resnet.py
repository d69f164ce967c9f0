"""The original CIFAR ResNets of He et al. (2016), as `zoo:cifar_resnet20/32/44/56/110`.

They are small enough to profile and evaluate on a CPU in seconds, yet deep enough that bit
allocation matters, so they are the reference models of tests and benchmarks. Neither timm nor
torchvision ships them. Module names follow the widely used pretrained checkpoints
(`conv1`, `bn1`, `layer1..3`, `linear`) so those load with strict key matching.

Never imports timm or transformers.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from allocator.zoo import register_zoo_model
from allocator.zoo.base import IMAGENET_MEAN, IMAGENET_STD, LoadedModel
from allocator.zoo.weights import load_weights_file

STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}
"""Depth 6n + 2: n BasicBlocks in each of the three stages."""

NUM_CLASSES = 10
IMAGE_SIZE = 32


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by two and zero-pad channels, adding no parameters.

    The pad goes on both sides of the channel axis, as in the checkpoints' training code; padding
    only one side would misalign every channel after the first stage.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers around a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = PadShortcut(in_channels, out_channels) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem conv, three stages of `blocks` BasicBlocks (16/32/64 channels), pool, linear head."""

    def __init__(self, blocks: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, STAGE_CHANNELS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.relu = nn.ReLU()
        in_channels = STAGE_CHANNELS[0]
        stages = []
        for index, channels in enumerate(STAGE_CHANNELS):
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(in_channels, channels, stride)]
            stage += [BasicBlock(channels, channels, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(STAGE_CHANNELS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(self.pool(out), 1))


def build(depth: int, weights: Path | None) -> LoadedModel:
    """A CIFAR ResNet of `depth` layers; randomly initialised unless `weights` is given."""
    ref = f"zoo:cifar_resnet{depth}"
    module = CifarResNet(BLOCKS_PER_STAGE[depth])
    if weights is not None:
        load_weights_file(module, weights, ref)
    return LoadedModel(
        ref=ref,
        module=module,
        task="classification",
        input_kind="image",
        image_size=IMAGE_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=NUM_CLASSES,
    )


for _depth in BLOCKS_PER_STAGE:
    register_zoo_model(f"cifar_resnet{_depth}")(partial(build, _depth))
