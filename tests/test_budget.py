"""Budget text: every accepted form, what it resolves to for a layer table, and the errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from allocator.budget import Budget, ResolvedBudget, parse_budget
from allocator.errors import BadBudget
from allocator.layers import Layer, LayerTable

TABLE = LayerTable(
    (
        Layer("a", "linear", params=1000, out_channels=10, macs=5000, group="a"),
        Layer("b", "conv2d", params=3000, out_channels=30, macs=90000, group="b"),
    )
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("avg-bits=4", Budget("avg-bits", 4.0, None)),
        ("size-mb=1.5", Budget("size-mb", 1.5, None)),
        ("compression=8", Budget("compression", 8.0, None)),
        ("bops=1.2e9", Budget(None, None, 1.2e9)),
        ("avg-bits=4,bops=2e9", Budget("avg-bits", 4.0, 2e9)),
        ("bops=2e9,size-mb=0.5", Budget("size-mb", 0.5, 2e9)),
        (" avg-bits = 3.5 , bops = 1e6 ", Budget("avg-bits", 3.5, 1e6)),
    ],
)
def test_parse_accepted_forms(text: str, expected: Budget) -> None:
    assert parse_budget(text) == expected


def test_resolve_each_form_to_bits() -> None:
    params = TABLE.total_params
    assert parse_budget("avg-bits=4").resolve(TABLE) == ResolvedBudget(
        size_bits=params * 4 + 40 * 16
    )
    assert parse_budget("size-mb=1.5").resolve(TABLE).size_bits == 1.5e6 * 8
    assert parse_budget("compression=8").resolve(TABLE).size_bits == 32 * params / 8
    assert parse_budget("bops=1.2e9").resolve(TABLE) == ResolvedBudget(size_bits=None, bops=1.2e9)
    both = parse_budget("avg-bits=16,bops=3e6").resolve(TABLE, act_bits=8)
    assert both == ResolvedBudget(size_bits=params * 16, bops=3e6)


@pytest.mark.parametrize(
    "text",
    [
        "avg-bits=4",
        "size-mb=1.5",
        "compression=8",
        "bops=1.2e9",
        "avg-bits=4,bops=2e9",
        "size-mb=0.1,bops=123456789.123",
    ],
)
def test_str_round_trips(text: str) -> None:
    budget = parse_budget(text)
    assert parse_budget(str(budget)) == budget


@given(
    form=st.sampled_from(["avg-bits", "size-mb", "compression", None]),
    size=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    bops=st.none() | st.floats(min_value=1.0, max_value=1e18, allow_nan=False),
)
def test_str_round_trips_any_value(form: str | None, size: float, bops: float | None) -> None:
    if form is None and bops is None:
        return
    budget = Budget(form, size if form else None, bops)
    assert parse_budget(str(budget)) == budget


def test_str_is_short() -> None:
    assert str(parse_budget("avg-bits=4.0,bops=2e9")) == "avg-bits=4,bops=2e+09"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "cannot read"),
        ("4 bits", "cannot read"),
        ("avg-bits", "cannot read"),
        ("bits=4", "cannot read"),
        ("avg-bits=four", "not a number"),
        ("avg-bits=0", "positive"),
        ("compression=-2", "positive"),
        ("size-mb=nan", "positive"),
        ("bops=inf", "positive"),
        ("avg-bits=4,size-mb=1", "at most one size term"),
        ("bops=1e9,bops=2e9", "twice"),
        ("avg-bits=4,", "cannot read"),
    ],
)
def test_bad_text_names_the_accepted_forms(text: str, says: str) -> None:
    with pytest.raises(BadBudget) as caught:
        parse_budget(text)
    message = str(caught.value)
    assert says in message
    if says != "positive":
        assert "avg-bits=4" in message and "size-mb=" in message and "bops=" in message


def test_resolved_budget_defaults_to_unconstrained() -> None:
    assert ResolvedBudget() == ResolvedBudget(size_bits=None, bops=None)


def test_match_is_the_size_and_bops_of_uniform_wxay() -> None:
    table = LayerTable(
        (
            Layer("stem", "conv", 100, 4, 1_000, "stem", 8),
            Layer("body", "linear", 1_000, 10, 20_000, "body", None),
        )
    )
    budget = parse_budget("match=W4A8")
    assert budget.match == (4, 8)
    assert str(budget) == "match=W4A8"
    assert parse_budget("match=w3a4").match == (3, 4)
    resolved = budget.resolve(table)
    assert resolved.size_bits == table.uniform_storage_bits(4)
    assert resolved.bops == 1_000 * 8 * 8 + 20_000 * 4 * 8


@pytest.mark.parametrize("text", ["match=4x8", "match=W4", "match=A8W4"])
def test_bad_match_says_how_to_write_it(text: str) -> None:
    with pytest.raises(BadBudget, match="match=W4A8"):
        parse_budget(text)
