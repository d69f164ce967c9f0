"""Rule sets chosen per width by the whole network's divergence on held-out samples."""

from __future__ import annotations

import torch
from torch import nn

from allocator import costs
from allocator.layers import build_layer_table
from allocator.weight_rules import PER_LAYER, RULE_SETS, fp32_outputs, select_rules
from allocator.zoo.base import LoadedModel


def _mlp() -> tuple[LoadedModel, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)
    )
    model = LoadedModel(ref="mlp", module=module.eval(), task="classification", input_kind="image")
    return model, [torch.randn(32, 16) for _ in range(2)], [torch.randn(32, 16)]


def test_each_width_takes_the_set_that_diverges_least_and_every_key_follows_it() -> None:
    model, batches, holdout = _mlp()
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    stats = costs.input_stats(model, batches, table)
    candidates = costs.rule_set_choices(model, table, stats, (2, 4, 8), RULE_SETS)

    choices, selection = select_rules(
        model, table, candidates, holdout, fp32_outputs(model, holdout)
    )

    assert set(selection.chosen) == {2, 4, 8}
    for b, measured in selection.divergence.items():
        assert set(measured) == set(RULE_SETS)
        assert measured[selection.chosen[b]] == min(measured.values())
    for (layer, b), choice in choices.items():
        assert choice is candidates[selection.chosen[b]][(layer, b)]
        assert (choice.clip, choice.rounding) in {
            (c, r)
            for c in RULE_SETS[selection.chosen[b]][0]
            for r in RULE_SETS[selection.chosen[b]][1]
        }
    assert selection.to_dict()["4"]["chosen"] == selection.chosen[4]


def test_a_worse_default_loses_to_the_set_that_keeps_the_outputs() -> None:
    model, batches, holdout = _mlp()
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    stats = costs.input_stats(model, batches, table)
    real = costs.quant_choices(model, table, stats, (2, 4))
    # A default that quietly uses its 2-bit weights for 4 bits must lose at 4 bits.
    broken = {(layer, b): real[(layer, 2)] for layer, b in real}
    choices, selection = select_rules(
        model, table, {PER_LAYER: broken, "honest": real}, holdout, fp32_outputs(model, holdout)
    )
    assert selection.chosen[4] == "honest"
    assert all(choices[(layer, 4)] is real[(layer, 4)] for layer in table.names)


def test_without_holdout_samples_the_per_layer_rules_stand() -> None:
    model, batches, _ = _mlp()
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    stats = costs.input_stats(model, batches, table)
    candidates = costs.rule_set_choices(model, table, stats, (4,), RULE_SETS)
    choices, selection = select_rules(model, table, candidates, [], [])
    assert selection.chosen == {} and selection.divergence == {}
    assert choices == candidates[PER_LAYER]
