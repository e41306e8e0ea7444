import random
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from verifiers.symbol_data import LADDER, SEED_TIER, Tier, build_symbol_dataset, write_jsonl
from verifiers.symbols import (
    SEED_SYMBOLS,
    SymbolError,
    SymbolMap,
    division_steps_whole,
    evaluate,
    generate_expression,
)


@pytest.mark.parametrize(
    "expr, value",
    [
        ("78 α 43 α 58", -23),
        ("50 α 32 γ 33", -1006),
        ("77 γ 77 θ 93 γ 78", 13183),
        ("82 γ 46 γ 56 γ 79", 16687328),
        ("3 θ 4", 7),
        ("10 α 3", 7),
        ("2 γ 6", 12),
        ("8 β 4 β 2", 1),  # left to right within a level
        ("10 α 3 α 2", 5),
        ("2 θ 3 γ 4", 14),  # × before +
        ("20 β 4 γ 5", 25),
        ("7", 7),
        ("3+4*2", 11),
        ("3 × 4 ÷ 6 − 1", 1),
        ("3 θ 4 * 2 - 1", 10),  # alphabets mix
        ("  12θ3  ", 15),  # spaces optional
        ("0 γ 99", 0),
    ],
)
def test_evaluate(expr, value):
    assert evaluate(expr) == value


def test_exact_rationals():
    assert evaluate("7 β 2") == Fraction(7, 2)
    assert evaluate("1 β 3 θ 1 β 3 θ 1 β 3") == 1


@pytest.mark.parametrize(
    "expr, where",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("3 θ", "ends with an operator"),
        ("θ 3", "position 0"),
        ("3 4", "position 2"),
        ("3 θ θ 4", "position 4"),
        ("3 ? 4", "'?' at position 2"),
        ("3.5 θ 1", "'.' at position 1"),
        ("-3 θ 1", "position 0"),
        ("(3 θ 1)", "'(' at position 0"),
    ],
)
def test_malformed_names_what_and_where(expr, where):
    with pytest.raises(SymbolError, match=where if "position" not in where else None) as info:
        evaluate(expr)
    assert isinstance(info.value, ValueError)
    assert where in str(info.value)


def test_division_by_zero():
    with pytest.raises(ZeroDivisionError):
        evaluate("5 β 0")
    with pytest.raises(ZeroDivisionError):
        evaluate("5 β 3 α 3 β 0")


def test_non_string_and_huge_inputs_are_symbol_errors():
    with pytest.raises(SymbolError):
        evaluate(12)  # type: ignore[arg-type]
    with pytest.raises(SymbolError, match="characters"):
        evaluate("1 θ " * 10_000 + "1")


def test_symbol_maps_are_data():
    held_out = SymbolMap.permuted("θαγβ", "*/+-")
    assert evaluate("6 θ 7 γ 2", held_out) == 44  # θ=×, γ=+
    other = SymbolMap({"@": "+", "#": "*"})
    assert evaluate("2 @ 3 # 4", other) == 14
    with pytest.raises(SymbolError):
        evaluate("2 θ 3", other)
    with pytest.raises(ValueError, match="standard operator"):
        SymbolMap({"+": "-"})
    with pytest.raises(ValueError, match="allowed"):
        SymbolMap({"@": "^"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="permutation"):
        SymbolMap.permuted("θαγβ", "++-/")


def test_generate_expression_shape():
    rng = random.Random(1)
    for n in (1, 2, 3, 4):
        for alphabet in ("custom", "standard"):
            expr, value = generate_expression(rng, n, alphabet, 1, 9)
            tokens = expr.split(" ")
            assert len(tokens) == 2 * n - 1
            assert all(1 <= int(t) <= 9 for t in tokens[::2])
            allowed = set("θαγβ") if alphabet == "custom" else set("+-*/")
            assert set(tokens[1::2]) <= allowed
            assert evaluate(expr) == value


def test_generate_expression_is_deterministic():
    assert generate_expression(random.Random(7), 4) == generate_expression(random.Random(7), 4)


def test_generate_expression_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_operands"):
        generate_expression(random.Random(0), 0)
    with pytest.raises(ValueError, match="alphabet"):
        generate_expression(random.Random(0), 2, "greek")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="low"):
        generate_expression(random.Random(0), 2, low=5, high=1)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(1, 5), alphabet=st.sampled_from(["custom", "standard"]),
       low=st.integers(0, 20), span=st.integers(0, 120))
def test_generator_answers_equal_evaluate(seed, n, alphabet, low, span):
    expr, value = generate_expression(random.Random(seed), n, alphabet, low, low + span)
    assert Fraction(value) == evaluate(expr)
    assert division_steps_whole(expr)


def test_division_steps_whole():
    assert division_steps_whole("12 β 4 β 3")
    assert not division_steps_whole("7 β 2 γ 2")  # whole result, fractional step
    assert evaluate("7 β 2 γ 2") == 7


def test_seed_dataset_split():
    train, test = build_symbol_dataset()
    assert (len(train), len(test)) == (1600, 400)
    assert sum(r["type"] == "custom" for r in test) == 200
    assert sum(r["type"] == "custom" for r in train) == 800
    for row in train[:200] + test[:200]:
        assert set(row) >= {"expression", "answer", "type"}
        assert evaluate(row["expression"]) == row["answer"]
        assert 2 <= len(row["expression"].split(" ")) // 2 + 1 <= 4
    assert build_symbol_dataset() == (train, test)
    assert build_symbol_dataset(seed=43) != (train, test)


def test_ladder_tiers():
    easiest = LADDER[0]
    train, test = build_symbol_dataset(n_per_type=50, tier=easiest)
    for row in train + test:
        operands = row["expression"].split(" ")[::2]
        assert len(operands) == 2 and all(1 <= int(x) <= 9 for x in operands)
        assert row["tier"] == "t1"
    assert SEED_TIER.high == 99
    with pytest.raises(ValueError, match="low"):
        Tier("bad", low=9, high=1)


def test_write_jsonl_roundtrip(tmp_path):
    import json

    train, _ = build_symbol_dataset(n_per_type=5)
    path = tmp_path / "a" / "train.jsonl"
    assert write_jsonl(train, path) == 8
    assert [json.loads(line) for line in path.read_text().splitlines()] == train
    assert not list(path.parent.glob("*.tmp"))


def test_unique_draws_keep_test_items_out_of_training():
    train, test = build_symbol_dataset(n_per_type=250, test_fraction=0.4, tier=LADDER[0], unique=True)
    assert len(test) == 200 and sum(r["type"] == "custom" for r in test) == 100
    assert not {r["expression"] for r in train} & {r["expression"] for r in test}
    assert len({r["expression"] for r in train + test}) == 500
    assert build_symbol_dataset(n_per_type=250, test_fraction=0.4, tier=LADDER[0], unique=True) == (train, test)
    with pytest.raises(ValueError, match="fewer than 267 distinct custom"):
        build_symbol_dataset(n_per_type=267, tier=LADDER[0], unique=True)


def test_symbols_in_and_to_standard():
    from verifiers.symbols import symbols_in, to_standard

    assert symbols_in("3 θ 4 × 2 − 1") == {"θ", "*", "-"}
    assert to_standard("9 β 3 γ 2 α 1 θ 0") == "9 / 3 * 2 - 1 + 0"
