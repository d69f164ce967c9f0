"""Hugging Face families end to end: BERT, DistilBERT, RoBERTa, ViT and causal LMs (GPT-2, Llama).

No model can be downloaded here, so every family is a tiny random-init model built from a small
config and saved with a tokenizer into a folder, as a user would hand one over: BERT and
DistilBERT borrow MiniLM's WordPiece files, the others get a byte-level BPE trained on the test
text in milliseconds. Each family runs a whole job, conserves relevance, and refuses data it
cannot read with one line.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from allocator import memory
from allocator.apply import load_packed
from allocator.data import EvalSet, TextCorpus, calibration_batches, evaluate, load_dataset
from allocator.data.batches import WINDOW_TOKENS, pool, token_windows, window_length
from allocator.data.evaluate import kl_divergence, perplexity
from allocator.data.readers import MAX_LINE_CHARS, DatasetTooLarge
from allocator.errors import BadDataset, UnknownModel
from allocator.job import JobSpec
from allocator.job_metrics import HIGHER_IS_BETTER
from allocator.layers import build_layer_table, weight_layers
from allocator.pipeline import run
from allocator.sensitivity.gradients import gradient_stats
from allocator.sensitivity.hessian import hessian_traces
from allocator.sensitivity.lrp import conservation
from allocator.sensitivity.measured import divergence
from allocator.zoo import LoadedModel, load_model
from bench.tiny_hf import (
    BPE_VOCAB,
    LAYERS,
    SENTENCES,
    bpe_tokenizer,
    build_folder,
    data_for,
    write_images,
    write_sts,
    write_text,
)
from service.cli import app
from tests.api_app import upload
from tests.test_zoo import counted_sdpa

transformers = pytest.importorskip("transformers", reason="needs pip install 'bitplan[bench]'")
tokenizers = pytest.importorskip("tokenizers", reason="needs pip install 'bitplan[bench]'")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONSERVATION_TOLERANCE = 1e-4
"""Relative gap allowed between the explained quantity and the relevance at the inputs plus
what biases absorbed; the rules are exact, so what remains is float32 rounding."""

FAMILIES = ("bert", "distilbert", "roberta", "vit", "gpt2", "llama")
PRIMARY = {
    "bert": "agreement",
    "distilbert": "agreement",
    "roberta": "agreement",
    "vit": "top1",
    "gpt2": "perplexity",
    "llama": "perplexity",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> its folder, built once per test module."""
    root = tmp_path_factory.mktemp("hf")
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = build_folder(family, root / family)
        return built[family]

    return folder


def sample_inputs(model: LoadedModel) -> object:
    if model.input_kind == "image":
        return torch.randn(3, 3, model.image_size, model.image_size)
    if model.task == "causal-lm":
        return model.prepare_windows(pool(TextCorpus(SENTENCES * 4), model)[:3])
    return model.prepare_text(SENTENCES[:3])


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "task", "kind"),
    [
        ("bert", "classification", "text"),
        ("distilbert", "classification", "text"),
        ("roberta", "classification", "text"),
        ("vit", "classification", "image"),
        ("gpt2", "causal-lm", "text"),
        ("llama", "causal-lm", "text"),
    ],
)
def test_each_family_loads_through_sdpa(
    family: str, task: str, kind: str, folders, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(f"hf:{folders(family)}")
    assert (model.task, model.input_kind) == (task, kind)
    assert model.module.config._attn_implementation == "sdpa"
    calls = counted_sdpa(monkeypatch)
    with torch.inference_mode():
        out = model(sample_inputs(model))
    assert len(calls) == 2  # one per layer: the relevance rules and act quantizers see them all
    if task == "causal-lm":
        assert out.shape == (3, window_length(model), BPE_VOCAB)
    else:
        assert out.shape == (3, model.num_classes)


def test_vit_reads_its_image_size_and_normalisation(folders, tmp_path: Path) -> None:
    plain = load_model(f"hf:{folders('vit')}")
    assert (plain.image_size, plain.num_classes) == (32, 5)
    assert (plain.mean, plain.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    folder = tmp_path / "vit"
    shutil.copytree(folders("vit"), folder)
    (folder / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": 0.25, "size": {"height": 32}}'
    )
    model = load_model(f"hf:{folder}")
    assert (model.mean, model.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    grey = np.full((1, 16, 16, 3), 255, dtype=np.uint8)
    x = model.prepare_images(grey)
    assert x.shape == (1, 3, 32, 32)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))
    (folder / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5]}')
    with pytest.raises(
        UnknownModel, match=r"preprocessor_config\.json is not JSON with image_mean"
    ):
        load_model(f"hf:{folder}")


def test_vit_without_a_head_embeds_images_by_its_class_token(tmp_path: Path) -> None:
    config = transformers.ViTConfig(hidden_size=32, image_size=32, patch_size=8, **LAYERS)
    transformers.ViTModel(config).save_pretrained(tmp_path)
    model = load_model(f"hf:{tmp_path}")
    assert (model.task, model.input_kind) == ("embedding", "image")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model.module(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(model(x), expected)


def test_gpt2_conv1d_layers_become_linear_with_identical_outputs(folders, tmp_path: Path) -> None:
    from allocator.zoo.hf_source import conv1d_to_linear

    conv1d = transformers.pytorch_utils.Conv1D
    original = transformers.GPT2LMHeadModel.from_pretrained(folders("gpt2")).eval()
    transposed = {f"{n}.weight" for n, m in original.named_modules() if isinstance(m, conv1d)}
    converted = copy.deepcopy(original)
    assert conv1d_to_linear(converted) == len(transposed) == 8  # 4 projections per block
    ids = torch.randint(0, BPE_VOCAB, (2, 20))
    with torch.inference_mode():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    after = dict(converted.named_parameters())
    for name, weight in original.named_parameters():
        torch.testing.assert_close(after[name], weight.T if name in transposed else weight)
    loaded = load_model(f"hf:{folders('gpt2')}")
    assert not any(isinstance(m, conv1d) for m in loaded.module.modules())
    assert len(list(weight_layers(loaded.module))) == 9  # the projections and the tied head

    # A weights file is in the layout of the model it came from: Conv1D's, read before converting.
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    state = {k: v.detach().clone() for k, v in original.state_dict().items()}
    save_file(state, tmp_path / "weights.safetensors")
    refit = load_model(f"hf:{folders('gpt2')}", tmp_path / "weights.safetensors")
    with torch.inference_mode():
        torch.testing.assert_close(refit(refit.prepare_windows(ids.numpy())), original(ids).logits)


# --- a whole job per family -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_job_runs_per_family(family: str, folders, tmp_path: Path) -> None:
    spec = JobSpec(
        model=f"hf:{folders(family)}",
        calib=str(data_for(family, tmp_path)),
        budget="avg-bits=4",
        method="lrp+fisher",
        bits=(3, 4, 8),
        calib_samples=8,
        batch_size=4,
        report=False,
        report_widths=False,
    )
    result = run(spec, workdir=tmp_path / "job")
    primary = result.metrics.primary
    assert primary == PRIMARY[family]
    assert set(result.plan.layers) == {row["layer"] for row in result.allocation}
    assert {row["weight_bits"] for row in result.allocation} <= {3, 4, 8}
    metrics = result.metrics
    assert metrics.uniform is not None
    for scores in (metrics.fp32, metrics.quantized, metrics.uniform.scores):
        assert math.isfinite(scores[primary])
    assert metrics.quantized["kl"] >= 0
    scores = [row["sensitivity"] for row in result.allocation]
    assert any(score["lrp"] for score in scores) and any(score["fisher"] for score in scores)
    if primary == "perplexity":
        assert metrics.fp32["agreement"] == 100.0
        assert metrics.quantized["perplexity"] > 1.0
        # A causal LM's packed artifact, tied head included, reloads to the model evaluated.
        model = load_model(spec.model)
        reloaded, _plan = load_packed(result.artifacts["model"], model.module)
        batch = calibration_batches(load_dataset(spec.calib), model, 2, 2)[0]
        with torch.inference_mode():
            logits = model.output_fn(reloaded, batch)
        assert torch.isfinite(logits).all()
        assert result.allocation[-1]["layer"] == "lm_head" and result.allocation[-1]["pinned"]


# --- relevance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_relevance_is_conserved(family: str, folders) -> None:
    """Relevance at the inputs (embeddings, pixels) plus what biases, class token and position
    embeddings absorb equals the explained quantity: the top logit for classifiers, the
    linearised log-probability of every true next token for causal LMs."""
    model = load_model(f"hf:{folders(family)}")
    torch.manual_seed(1)
    with torch.no_grad():  # random-init biases are zero: make them carry relevance too
        for name, parameter in model.module.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    check = conservation(model, sample_inputs(model))
    assert check.relative_error < CONSERVATION_TOLERANCE, check
    assert (check.absorbed != 0) == (family != "llama")  # Llama has no biases
    assert abs(check.input_relevance) > 0.05 * abs(check.explained)


def test_a_causal_lm_explains_the_log_probability_of_the_true_next_tokens(folders) -> None:
    from allocator.sensitivity.gradients import _objectives

    model = load_model(f"hf:{folders('llama')}")
    inputs = sample_inputs(model)
    logits = model(inputs)
    _loss, explained = _objectives(model, inputs, logits, torch.Generator())
    log_probs = logits.log_softmax(-1)[:, :-1]
    true = log_probs.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    # z_y - E_p[z] = log p(y) + H(p): the log-probability up to a term with no gradient here.
    torch.testing.assert_close(explained, (true + entropy).sum(-1))
    (grad,) = torch.autograd.grad(explained.sum(), logits)
    (expected,) = torch.autograd.grad(true.sum(), logits)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fisher_of_a_causal_lm_is_that_of_its_lm_loss(family: str, folders) -> None:
    model = load_model(f"hf:{folders(family)}")
    inputs = sample_inputs(model)
    table = build_layer_table(model, {k: v[:1] for k, v in inputs.items()})
    stats = gradient_stats(model, [inputs], table, fisher=True, lrp=False)
    name = table.names[1]
    layer = dict(model.module.named_modules())[name]
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    expected = 0
    try:
        for ids in inputs["input_ids"]:
            outputs.clear()
            logits = model({"input_ids": ids[None]})
            loss = nn.functional.cross_entropy(logits[0, :-1], ids[1:], reduction="sum")
            (g,) = torch.autograd.grad(loss, [outputs[0]])
            expected = expected + (g**2).reshape(-1, g.shape[-1]).sum(0)
    finally:
        handle.remove()
    torch.testing.assert_close(stats.fisher_out[name], expected / len(inputs["input_ids"]))


def test_hessian_traces_of_a_causal_lm_are_finite(folders) -> None:
    model = load_model(f"hf:{folders('llama')}")
    inputs = sample_inputs(model)
    table = build_layer_table(model, {k: v[:1] for k, v in inputs.items()})
    traces = hessian_traces(model, [inputs], table, tol=0.1, max_probes=10)
    assert set(traces.trace) == set(table.names)
    assert all(v >= 0 and math.isfinite(v) for v in traces.trace.values())
    assert any(v > 0 for v in traces.trace.values())


def test_measured_divergence_of_a_causal_lm_averages_positions() -> None:
    reference = torch.randn(2, 5, 7)
    output = reference.clone()
    output[1, 2] += torch.randn(7)
    per_window = divergence("causal-lm", reference, output)
    assert per_window.shape == (2,)
    assert per_window[0] == 0 and per_window[1] > 0
    single = divergence("classification", reference[1, 2][None], output[1, 2][None])
    torch.testing.assert_close(per_window[1], single[0] / 5)


# --- text, windows and perplexity --------------------------------------------------------------

BIGRAM_VOCAB = "ab\n"
BIGRAM_LOGITS = [[0.0, 1.0, 2.0], [2.0, 0.0, -1.0], [1.0, 1.0, 0.0]]


class Bigram(nn.Module):
    """Next-token logits that depend on the current token only: a row of a fixed table."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding.from_pretrained(torch.tensor(BIGRAM_LOGITS))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


def bigram_model(context_length: int = 4) -> LoadedModel:
    return LoadedModel(
        ref="test:bigram",
        module=Bigram(),
        task="causal-lm",
        input_kind="text",
        output_fn=lambda module, inputs: module(inputs["input_ids"]),
        encode=lambda text: [BIGRAM_VOCAB.index(char) for char in text],
        context_length=context_length,
    )


def test_perplexity_matches_a_hand_computation(tmp_path: Path) -> None:
    (tmp_path / "two.txt").write_text("abab\nba\na", encoding="utf-8")
    corpus = load_dataset(tmp_path / "two.txt")
    model = bigram_model()
    # "abab\nba\na\n": ten tokens, two windows of four; the last two fill no window.
    evalset = EvalSet(corpus, model)
    assert len(evalset) == 2 and evalset.primary_metric == "perplexity"
    pairs = ["ab", "ba", "ab", "\nb", "ba", "a\n"]  # (token, next token) inside each window

    def nll(current: str, following: str) -> float:
        row = BIGRAM_LOGITS[BIGRAM_VOCAB.index(current)]
        return math.log(sum(math.exp(z) for z in row)) - row[BIGRAM_VOCAB.index(following)]

    expected = math.exp(sum(nll(*pair) for pair in pairs) / len(pairs))
    reference = evalset.outputs(model)
    metrics = evaluate(model, evalset, reference)
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-12)
    assert (metrics["agreement"], metrics["kl"]) == (100.0, 0.0)
    assert HIGHER_IS_BETTER["perplexity"] is False

    worse = bigram_model()
    with torch.no_grad():
        worse.module.table.weight[0] = torch.tensor([0.0, 0.0, 0.0])
    other = evaluate(worse, evalset, reference)
    assert other["perplexity"] > metrics["perplexity"] and other["kl"] > 0
    assert other["agreement"] == pytest.approx(100 * 5 / 8)  # the three "a" positions changed


def test_kl_and_perplexity_over_many_windows_are_the_plain_means() -> None:
    """They are computed a chunk of windows at a time, to bound the float64 copies."""
    torch.manual_seed(0)
    reference, logits = torch.randn(150, 6, 11), torch.randn(150, 6, 11)
    tokens = torch.randint(0, 11, (150, 6))
    log_p, log_q = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    plain_kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert kl_divergence(reference, logits) == pytest.approx(plain_kl, rel=1e-12)
    nll = -log_q[:, :-1].gather(-1, tokens[:, 1:, None]).mean().item()
    assert perplexity(logits, tokens) == pytest.approx(math.exp(nll), rel=1e-12)


def test_text_is_cut_into_windows_for_calibration_and_evaluation() -> None:
    corpus = TextCorpus(["abab", "", "baba"])  # "abab\n\nbaba\n": eleven tokens
    windows = token_windows(corpus, bigram_model(context_length=3))
    np.testing.assert_array_equal(windows, [[0, 1, 0], [1, 2, 2], [1, 0, 1]])
    assert window_length(bigram_model(context_length=None)) == WINDOW_TOKENS
    assert window_length(bigram_model(context_length=1024)) == WINDOW_TOKENS
    assert token_windows(TextCorpus(["ab"]), bigram_model()).shape == (1, 3)  # one short window
    batches = calibration_batches(corpus, bigram_model(context_length=3), n=2, batch_size=1)
    assert [batch["input_ids"].shape for batch in batches] == [(1, 3), (1, 3)]
    assert len(EvalSet(corpus, bigram_model(context_length=3), limit=2)) == 2


def test_other_text_models_read_a_text_file_a_line_per_sentence(folders, tmp_path: Path) -> None:
    model = load_model(f"hf:{folders('roberta')}")
    path = tmp_path / "lines.txt"
    path.write_text("\n".join([SENTENCES[0], "", SENTENCES[1], "  "]) + "\n", encoding="utf-8")
    evalset = EvalSet(load_dataset(path), model)
    assert len(evalset) == 2 and evalset.primary_metric == "agreement"
    metrics = evaluate(model, evalset, evalset.outputs(model))
    assert metrics["agreement"] == 100.0


def test_memory_estimate_runs_a_causal_lm_window(folders) -> None:
    model = load_model(f"hf:{folders('gpt2')}")
    sample = sample_inputs(model)
    sample = {key: value[:1] for key, value in sample.items()}
    estimate = memory.estimate(model, sample, batch_size=4, samples=16, widths=3)
    assert estimate.input_bytes_per_sample == 8 * window_length(model)
    assert estimate.activation_bytes_per_sample >= 4 * window_length(model) * BPE_VOCAB  # logits
    estimate.check(1 << 30)


# --- errors a user can act on ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "data", "needle"),
    [
        ("vit", "text.txt", "holds text; give an .npz of images"),
        ("bert", "images.npz", "holds images; give a .csv/.tsv of sentence pairs or a .txt"),
        ("gpt2", "images.npz", "takes running text but the dataset holds images; give a .txt"),
        ("llama", "pairs.tsv", "holds sentence pairs; give a .txt of UTF-8 text"),
    ],
)
def test_data_of_the_wrong_kind_is_one_line(
    family: str, data: str, needle: str, folders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers = {"text.txt": write_text, "images.npz": write_images, "pairs.tsv": write_sts}
    path = writers[data](tmp_path / data)
    monkeypatch.setenv("BITPLAN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BITPLAN_DATABASE_URL", raising=False)
    ref = f"hf:{folders(family)}"
    result = CliRunner().invoke(
        app, ["run", "--model", ref, "--calib", str(path), "--calib-samples", "4"]
    )
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr
    # transformers draws a progress bar on stderr while it loads; the error is the one line after.
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert needle in error


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "holds no text"),
        (b" \n\t\n\n", "holds no text"),
        (b"caf\xe9\n", "not UTF-8 text"),
        (b"x" * (MAX_LINE_CHARS + 1), "longer than"),
    ],
)
def test_unreadable_text_files_are_refused(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(BadDataset, match=needle) as caught:
        load_dataset(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_text_is_refused_above_the_size_limit_before_it_is_read(tmp_path: Path) -> None:
    path = write_text(tmp_path / "text.txt")
    with pytest.raises(DatasetTooLarge, match="send less text"):
        load_dataset(path, max_bytes=100)


def test_text_too_short_for_a_causal_lm_says_so() -> None:
    one_token = dataclasses.replace(bigram_model(), encode=lambda text: [0])
    with pytest.raises(BadDataset, match=r"is 1 token\(s\) long .* needs at least two"):
        token_windows(TextCorpus(["a"]), one_token)


def test_a_folder_without_a_tokenizer_is_refused(folders, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folders("gpt2") / name, tmp_path / name)
    with pytest.raises(UnknownModel, match=r"has no tokenizer .* tokenizer\.save_pretrained"):
        load_model(f"hf:{tmp_path}")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=100)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    bpe_tokenizer("gpt2").save_pretrained(tmp_path)
    with pytest.raises(UnknownModel, match=f"{BPE_VOCAB} tokens but the model's vocab_size is 100"):
        load_model(f"hf:{tmp_path}")


@pytest.mark.parametrize("config", ['{"model_type": "nosuch"}', "{}"])
def test_a_config_transformers_cannot_read_is_one_line(tmp_path: Path, config: str) -> None:
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(UnknownModel, match=r"cannot read .*config\.json") as caught:
        load_model(f"hf:{tmp_path}")
    assert "\n" not in str(caught.value)


def test_weights_that_do_not_fit_the_folders_config_are_one_line(folders, tmp_path: Path) -> None:
    shutil.copytree(folders("gpt2"), tmp_path, dirs_exist_ok=True)
    config = transformers.GPT2Config.from_pretrained(tmp_path)
    config.n_embd = 16
    config.save_pretrained(tmp_path)
    with pytest.raises(UnknownModel, match=r"do not fit its config\.json") as caught:
        load_model(f"hf:{tmp_path}")
    assert "\n" not in str(caught.value)


def test_text_files_are_accepted_as_dataset_uploads(client, acme: dict[str, str]) -> None:
    text = ("\n".join(SENTENCES) + "\n").encode()
    response = upload(client, acme, "datasets", "corpus.txt", text)
    assert response.status_code == 201, response.text
    refused = upload(client, acme, "datasets", "empty.txt", b"\n\n")
    assert refused.status_code == 422 and "holds no text" in refused.text
