"""The symbol dataset: custom and standard expressions, seeded, split per type.

The seed's protocol (``build_symbol_dataset()`` with its defaults): one ``random.Random(42)``
draws 1000 custom-symbol expressions, then 1000 standard ones, each with a operand count
uniform in 2–4 and operands in [1, 99]; each type is shuffled and split 80/20; train and
test are each merged (custom first) and shuffled. Rows are
``{"expression", "answer", "type"}`` (plus ``"tier"`` when built from a ladder).

A difficulty :class:`Tier` sets the operand range and count, so a small model can start on
one-digit, two-operand items (:data:`LADDER`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from verifiers.symbols import SEED_SYMBOLS, SymbolMap, generate_expression


@dataclass(frozen=True)
class Tier:
    """One rung of the difficulty ladder: operands in [low, high], a count in [min_ops, max_ops]."""

    name: str
    low: int = 1
    high: int = 99
    min_operands: int = 2
    max_operands: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError(f"tier {self.name!r}: need 0 <= low <= high, got {self.low}, {self.high}")
        if not 1 <= self.min_operands <= self.max_operands:
            raise ValueError(
                f"tier {self.name!r}: need 1 <= min_operands <= max_operands, "
                f"got {self.min_operands}, {self.max_operands}"
            )


SEED_TIER = Tier("seed")
LADDER: tuple[Tier, ...] = (
    Tier("t1", low=1, high=9, min_operands=2, max_operands=2),
    Tier("t2", low=1, high=9, min_operands=2, max_operands=3),
    Tier("t3", low=1, high=99, min_operands=2, max_operands=2),
    Tier("t4", low=1, high=99, min_operands=2, max_operands=4),
)


MAX_REPEATS = 100_000
"""Consecutive repeated draws after which ``unique`` gives up (the tier has too few items)."""


def _draw(rng: random.Random, n: int, alphabet: str, tier: Tier, symbols: SymbolMap,
          unique: bool = False) -> list[dict]:
    rows, seen, repeats = [], set(), 0
    while len(rows) < n:
        n_operands = rng.randint(tier.min_operands, tier.max_operands)
        expr, answer = generate_expression(rng, n_operands, alphabet, tier.low, tier.high, symbols)  # type: ignore[arg-type]
        if unique and expr in seen:
            repeats += 1
            if repeats > MAX_REPEATS:
                raise ValueError(f"tier {tier.name!r} has fewer than {n} distinct {alphabet} expressions "
                                 f"(found {len(rows)}); lower n_per_type or use a larger tier")
            continue
        seen.add(expr)
        repeats = 0
        rows.append({"expression": expr, "answer": answer, "type": alphabet, "tier": tier.name})
    return rows


def build_symbol_dataset(
    n_per_type: int = 1000,
    seed: int = 42,
    test_fraction: float = 0.2,
    tier: Tier = SEED_TIER,
    symbols: SymbolMap = SEED_SYMBOLS,
    unique: bool = False,
) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` rows; the defaults reproduce the seed's 1600 / 400 split.

    ``unique`` draws distinct expressions within each type, so no test item is ever trained on
    (the seed's independent draws repeat items in small tiers: t1 has 266 per type).
    """
    if n_per_type < 1:
        raise ValueError(f"n_per_type must be >= 1, got {n_per_type}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = random.Random(seed)
    per_type = [_draw(rng, n_per_type, alphabet, tier, symbols, unique) for alphabet in ("custom", "standard")]
    train: list[dict] = []
    test: list[dict] = []
    for rows in per_type:  # custom first, as the seed merged them
        rng.shuffle(rows)
        n_train = round(len(rows) * (1.0 - test_fraction))
        train += rows[:n_train]
        test += rows[n_train:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_jsonl(rows: Iterable[dict], path: Path) -> int:
    """Write rows atomically (temp file, then rename); returns the row count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count
