"""Train a small Llama-style causal LM on the STS-B training sentences, on the CPU.

    python bench/train_tiny_lm.py               # minutes on 2 CPU cores; prints its time

Mixed precision for causal LMs needs a trained LM to be measured on: a random-init model's next
token barely depends on its weights, so quantizing them changes almost nothing, and no pretrained
LM can be downloaded here. The STS-B sentences in ../shared/data are real English text, enough for
a model of a few layers to learn word statistics and the phrasing its paraphrase pairs repeat.

Writes to bench/out/tiny-lm/ (or --out) a Hugging Face folder (config, safetensors, a byte-level
BPE tokenizer trained on the same sentences) that `hf:<folder>` loads, and next to it `train.txt`
(the training sentences, one per line, pair after pair: calibration text) and `dev.txt` (the dev
sentences: evaluation text the model and its calibration never saw). Seeded, on a fixed number of
threads, so a rerun on the same machine gives the same weights.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allocator.data import EvalSet, evaluate, load_dataset  # noqa: E402
from allocator.data.batches import WINDOW_TOKENS  # noqa: E402
from allocator.zoo import load_model  # noqa: E402

DATA = Path(os.environ.get("BITPLAN_SHARED_DATA", ROOT.parent / "shared" / "data"))
STSB = DATA / "stsb"
OUT = ROOT / "bench" / "out" / "tiny-lm"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
SEED = 0
THREADS = 2
"""Fixed, so that the float sums, and so the weights, are the same on every run here."""


@dataclass(frozen=True)
class TrainConfig:
    """The model's shape and the schedule; the defaults are the bench's model, the smoke test
    shrinks them. Windows are as long as the ones bitplan cuts the text into."""

    vocab: int = 2048
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    window: int = WINDOW_TOKENS
    batch: int = 16
    steps: int = 500
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1


def sts_sentences(path: Path) -> list[str]:
    """Both sentences of every pair, in file order: a pair's paraphrase follows its sentence, so
    the model can learn to reuse what it just read."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [s.strip() for row in rows for s in (row[5], row[6])]


def write_text(path: Path, sentences: list[str]) -> Path:
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return path


def train_tokenizer(sentences: list[str], vocab: int) -> transformers.PreTrainedTokenizerFast:
    # tokenizers and transformers come with the `bench` extra: imported here, so that
    # bench/quality.py can name this module's paths without them.
    import tokenizers
    import transformers

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sentences, vocab_size=vocab, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )  # fmt: skip
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_model(config: TrainConfig, vocab: int) -> transformers.LlamaForCausalLM:
    """Untied head: bitplan then sees the head as one more linear layer (pinned with the stem)."""
    import transformers

    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=config.hidden,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.heads,
            intermediate_size=config.intermediate,
            max_position_embeddings=config.window,
            tie_word_embeddings=False,
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
            attn_implementation="sdpa",
        )
    )


def token_stream(tokenizer: transformers.PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """The text as one stream of ids, tokenized as bitplan tokenizes a .txt (no special tokens,
    line ends kept)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def schedule(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to a tenth of the peak rate."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


def fit(model: torch.nn.Module, stream: torch.Tensor, config: TrainConfig) -> None:
    """AdamW on windows cut at random offsets of the stream: a fresh cut every step, so a
    corpus this small does not repeat window for window."""
    generator = torch.Generator().manual_seed(SEED)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest}],
        lr=config.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(config))
    offsets = torch.arange(config.window)
    model.train()
    for _step in range(config.steps):
        starts = torch.randint(0, len(stream) - config.window, (config.batch,), generator=generator)
        windows = stream[starts[:, None] + offsets]
        loss = model(input_ids=windows, labels=windows, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
    model.eval()


def dev_perplexity(folder: Path, dev: Path) -> float:
    """FP32 perplexity on the dev text, measured as bitplan measures it (the same windows)."""
    loaded = load_model(f"hf:{folder}", None)
    evalset = EvalSet(load_dataset(str(dev)), loaded)
    return evaluate(loaded, evalset)["perplexity"]


def train(out: Path = OUT, config: TrainConfig = TrainConfig(), stsb: Path = STSB) -> float:
    """Train and save the model, its tokenizer and both texts under `out`; returns the FP32
    dev perplexity."""
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        train_sentences = sts_sentences(stsb / "sts-train.csv")
        out.mkdir(parents=True, exist_ok=True)
        train_txt = write_text(out / "train.txt", train_sentences)
        dev_txt = write_text(out / "dev.txt", sts_sentences(stsb / "sts-dev.csv"))
        folder = out / "model"
        tokenizer = train_tokenizer(train_sentences, config.vocab)
        model = build_model(config, len(tokenizer))
        fit(model, token_stream(tokenizer, train_txt.read_text(encoding="utf-8")), config)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return dev_perplexity(folder, dev_txt)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    args = parser.parse_args()
    config = TrainConfig(steps=args.steps)
    started = time.perf_counter()
    perplexity = train(args.out, config)
    print(
        f"tiny LM: dev perplexity {perplexity:.2f} (FP32) in {time.perf_counter() - started:.0f} s"
    )
    print(f"settings: {asdict(config)}")
    print(f"model: hf:{args.out / 'model'}")
    print(f"calib: {args.out / 'train.txt'}  eval: {args.out / 'dev.txt'}")


if __name__ == "__main__":
    main()
