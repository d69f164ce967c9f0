"""Train a small timm VisionTransformer on scikit-learn's bundled handwritten digits.

    python bench/train_digits_vit.py            # ~1-2 min on 2 CPU cores

ViT-specific quantizers (post-LayerNorm reparameterization, post-Softmax log quantizers) need a
real trained ViT to be measured on: random weights have none of the channel outliers and peaked
attention they are made for, and no ImageNet ViT can be downloaded here. The 1,797 8x8 digits ship
inside scikit-learn, so this runs anywhere, deterministically (seeded, one thread).

Writes to bench/out/digits/ (or --out): `vit.safetensors` (the weights), `train.npz` / `test.npz`
(`images` NHWC uint8 with the 0..16 grey levels scaled to 0..255 and copied to 3 channels,
`labels`), and prints the model reference to use with `bitplan run --model`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allocator.zoo import load_model  # noqa: E402

MODEL_REF = (
    "timm:vit_tiny_patch16_224?img_size=8&patch_size=2&embed_dim=64&depth=4&num_heads=4"
    "&mlp_ratio=2&num_classes=10"
)
TEST_FRACTION = 0.25
EPOCHS = 60
BATCH = 32
SEED = 0


def split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed, stratified-by-shuffle train/test split of the digits as NHWC uint8 RGB."""
    digits = load_digits()
    images = np.repeat((digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, -1)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(len(labels) * (1 - TEST_FRACTION))
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


def train(out: Path, epochs: int = EPOCHS) -> float:
    """Train, save weights and data under `out`; returns the test accuracy in percent."""
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = split()
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "train.npz", images=train_x, labels=train_y)
    np.savez(out / "test.npz", images=test_x, labels=test_y)
    loaded = load_model(MODEL_REF, None)
    model = loaded.module
    inputs = loaded.prepare_images(train_x)
    targets = torch.from_numpy(train_y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * ((len(targets) + BATCH - 1) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _epoch in range(epochs):
        for batch in torch.randperm(len(targets), generator=generator).split(BATCH):
            loss = loss_fn(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        predicted = model(loaded.prepare_images(test_x)).argmax(-1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "vit.safetensors")
    return float((predicted == torch.from_numpy(test_y)).float().mean()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "digits")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    started = time.perf_counter()
    accuracy = train(args.out, args.epochs)
    print(f"digits ViT: test top-1 {accuracy:.2f} % in {time.perf_counter() - started:.0f} s")
    print(f"model: {MODEL_REF}")
    print(f"weights: {args.out / 'vit.safetensors'}")
    print(f"calib: {args.out / 'train.npz'}  eval: {args.out / 'test.npz'}")


if __name__ == "__main__":
    main()
