"""Custom-symbol arithmetic: the reference experiment's task.

An expression is integers joined by binary operators. The seed's custom symbols are
θ (+), α (−), γ (×) and β (÷); the standard ``+ - * / × ÷`` are always understood too, and
the two alphabets may be mixed. × and ÷ bind tighter than + and −; operators of one level
associate left to right. Arithmetic is exact (:class:`fractions.Fraction`).

A symbol map is data (:class:`SymbolMap`), so a task can hold out another permutation of
the four operations, or use other symbols altogether.

>>> evaluate("78 α 43 α 58")
Fraction(-23, 1)
>>> evaluate("3+4×2")
Fraction(11, 1)
>>> evaluate("7 β 2")
Fraction(7, 2)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Literal, Mapping

Op = Literal["+", "-", "*", "/"]
OPS: tuple[Op, ...] = ("+", "-", "*", "/")
STANDARD_SYMBOLS: Mapping[str, Op] = MappingProxyType(
    {"+": "+", "-": "-", "*": "*", "/": "/", "×": "*", "÷": "/", "−": "-"}
)
_TIGHT: frozenset[str] = frozenset("*/")
MAX_EXPRESSION_CHARS = 10_000  # a longer "expression" is refused, not parsed


class SymbolError(ValueError):
    """A malformed expression; the message says what is wrong and at which position."""


@dataclass(frozen=True)
class SymbolMap:
    """Which symbol means which operation.

    ``custom`` maps each custom symbol to one of ``+ - * /``; the standard symbols are
    always understood as well. A custom symbol may not be a digit, a space or a standard
    symbol.
    """

    custom: Mapping[str, Op]

    def __post_init__(self) -> None:
        for symbol, op in self.custom.items():
            if len(symbol) != 1 or symbol.isdigit() or symbol.isspace():
                raise ValueError(f"symbol {symbol!r} must be one non-digit, non-space character")
            if symbol in STANDARD_SYMBOLS:
                raise ValueError(f"symbol {symbol!r} is a standard operator")
            if op not in OPS:
                raise ValueError(f"symbol {symbol!r} maps to {op!r}; allowed: {', '.join(OPS)}")
        object.__setattr__(self, "custom", MappingProxyType(dict(self.custom)))

    @classmethod
    def permuted(cls, symbols: str, ops: str) -> "SymbolMap":
        """``SymbolMap.permuted("θαγβ", "+-*/")`` is the seed's map; other orders hold out."""
        if sorted(ops) != sorted(OPS) or len(symbols) != 4:
            raise ValueError(f"need 4 symbols and a permutation of '+-*/', got {symbols!r}, {ops!r}")
        return cls(dict(zip(symbols, ops)))  # type: ignore[arg-type]

    def operator(self, char: str) -> Op | None:
        return self.custom.get(char) or STANDARD_SYMBOLS.get(char)

    def symbol_for(self, op: Op) -> str:
        """The custom symbol of an operation (the first, if several share it)."""
        for symbol, mapped in self.custom.items():
            if mapped == op:
                return symbol
        raise KeyError(f"no custom symbol for {op!r}")


SEED_SYMBOLS = SymbolMap.permuted("θαγβ", "+-*/")


def symbols_in(expression: str, symbols: SymbolMap = SEED_SYMBOLS) -> set[str]:
    """The operators an expression uses: its custom symbols, and standard ones as ``+ - * /``.

    >>> sorted(symbols_in("3 θ 4 × 2"))
    ['*', 'θ']
    """
    present = {c for c in expression if c in symbols.custom}
    return present | {STANDARD_SYMBOLS[c] for c in expression if c in STANDARD_SYMBOLS}


def to_standard(expression: str, symbols: SymbolMap = SEED_SYMBOLS) -> str:
    """The expression with each custom symbol replaced by its standard operator (``+ - * /``).

    >>> to_standard("3 θ 4 γ 2")
    '3 + 4 * 2'
    """
    return "".join(symbols.custom.get(ch, ch) for ch in expression)


def tokenize(expr: str, symbols: SymbolMap = SEED_SYMBOLS) -> list[int | Op]:
    """Split into alternating operands and operators: ``[int, op, int, op, int, ...]``."""
    if not isinstance(expr, str):
        raise SymbolError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise SymbolError(f"expression is {len(expr)} characters; at most {MAX_EXPRESSION_CHARS}")
    tokens: list[int | Op] = []
    i, n = 0, len(expr)
    while i < n:
        char = expr[i]
        if char.isspace():
            i += 1
            continue
        expect_operand = len(tokens) % 2 == 0
        if "0" <= char <= "9":
            if not expect_operand:
                raise SymbolError(f"expected an operator at position {i}, found {char!r}")
            start = i
            while i < n and "0" <= expr[i] <= "9":
                i += 1
            tokens.append(int(expr[start:i]))
            continue
        op = symbols.operator(char)
        if op is None:
            raise SymbolError(f"unexpected character {char!r} at position {i}")
        if expect_operand:
            raise SymbolError(f"expected an integer at position {i}, found operator {char!r}")
        tokens.append(op)
        i += 1
    if not tokens:
        raise SymbolError("empty expression")
    if len(tokens) % 2 == 0:
        raise SymbolError(f"expression ends with an operator at position {len(expr.rstrip()) - 1}")
    return tokens


def _apply(op: Op, left: Fraction, right: Fraction) -> Fraction:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0:
        raise ZeroDivisionError("division by zero")
    return left / right


def evaluate(expr: str, symbols: SymbolMap = SEED_SYMBOLS) -> Fraction:
    """The exact value of ``expr``; :class:`SymbolError` when malformed.

    >>> evaluate("77 γ 77 θ 93 γ 78")
    Fraction(13183, 1)
    """
    tokens = tokenize(expr, symbols)
    # One pass: fold × and ÷ into the current term, add finished terms to the total.
    total = Fraction(0)
    pending_sign: Op = "+"
    term = Fraction(tokens[0])  # type: ignore[arg-type]
    for k in range(1, len(tokens), 2):
        op, operand = tokens[k], Fraction(tokens[k + 1])  # type: ignore[arg-type]
        if op in _TIGHT:
            term = _apply(op, term, operand)  # type: ignore[arg-type]
        else:
            total = _apply(pending_sign, total, term)
            pending_sign, term = op, operand  # type: ignore[assignment]
    return _apply(pending_sign, total, term)


def division_steps_whole(expr: str, symbols: SymbolMap = SEED_SYMBOLS) -> bool:
    """True when every ÷ inside ``expr`` divides a whole number evenly (the seed's filter)."""
    tokens = tokenize(expr, symbols)
    term = Fraction(tokens[0])  # type: ignore[arg-type]
    for k in range(1, len(tokens), 2):
        op, operand = tokens[k], Fraction(tokens[k + 1])  # type: ignore[arg-type]
        if op in _TIGHT:
            term = _apply(op, term, operand)  # type: ignore[arg-type]
            if term.denominator != 1:
                return False
        else:
            term = operand
    return True


Alphabet = Literal["custom", "standard"]
_STANDARD_CHARS: Mapping[Op, str] = {"+": "+", "-": "-", "*": "*", "/": "/"}
MAX_DRAWS = 10_000


def generate_expression(
    rng: random.Random,
    n_operands: int,
    alphabet: Alphabet = "custom",
    low: int = 1,
    high: int = 99,
    symbols: SymbolMap = SEED_SYMBOLS,
) -> tuple[str, int]:
    """A random expression whose every division step and result are whole, and its value.

    Operands are uniform in ``[low, high]``, operators uniform over the four operations;
    draws that divide unevenly are rejected and redrawn (so the result depends only on
    ``rng``'s state). Tokens are separated by single spaces.

    >>> generate_expression(random.Random(0), 3)
    ('50 θ 98 γ 54', 5342)
    """
    if n_operands < 1:
        raise ValueError(f"n_operands must be >= 1, got {n_operands}")
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got low={low}, high={high}")
    if alphabet not in ("custom", "standard"):
        raise ValueError(f"alphabet must be 'custom' or 'standard', got {alphabet!r}")
    spell = symbols.symbol_for if alphabet == "custom" else _STANDARD_CHARS.__getitem__
    for _ in range(MAX_DRAWS):
        operands = [rng.randint(low, high) for _ in range(n_operands)]
        ops = [rng.choice(OPS) for _ in range(n_operands - 1)]
        parts = [str(operands[0])]
        for op, operand in zip(ops, operands[1:]):
            parts += [spell(op), str(operand)]
        expr = " ".join(parts)
        try:
            if not division_steps_whole(expr, symbols):
                continue
            value = evaluate(expr, symbols)
        except ZeroDivisionError:
            continue
        if value.denominator == 1:
            return expr, int(value)
    raise ValueError(f"no whole-valued expression in {MAX_DRAWS} draws (low={low}, high={high})")
