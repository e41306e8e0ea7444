r"""Plain SymPy / Python syntax (``sin(x)**2 + cos(x)**2``, ``exp(0)``), and the check that
keeps a "not equal" from being a confident wrong answer. Runs inside the sandbox's worker
(:mod:`verifiers._sandbox`), whose budget bounds SymPy's time.

Reading: math-verify's LaTeX reader takes ``sin(x)`` for the product ``s·i·n·x``, and its
plain reader ``eval``\ s its input (SymPy's ``parse_expr``). So text that calls one of
:data:`verifiers.sympy_tools.FUNCTIONS` and has no backslash is read by
:func:`verifiers.sympy_tools.parse` (Python's ``ast`` over a whitelist, never ``eval``; a
decimal is the exact fraction written; symbols are real, as math-verify makes them);
everything else stays with the LaTeX reader.

Undecided: math-verify answers "not equal" when SymPy fails to prove an identity. Two
expressions it calls unequal are evaluated at :data:`POINTS` (each free symbol its own
value); when the difference vanishes at every point, the pair is "cannot judge", not
"different".
"""

from __future__ import annotations

import re

from verifiers.sympy_tools import FUNCTIONS, ToolInputError, parse

_CALL = re.compile(r"(?<![A-Za-z\\])(?:" + "|".join(FUNCTIONS) + r")\s*\(")
POINTS = ("-1.37", "0.43", "2.61")
"""Where a difference is evaluated; symbol i (sorted by name) gets ``point * (1 + 0.173 i)``."""
TOLERANCE = 1e-9
"""Relative: a difference below ``TOLERANCE * (1 + |pred| + |gold|)`` at a point is zero."""


def is_plain_call(text: str) -> bool:
    """Text that calls a known function in plain syntax (``sin(x)``, not ``\\sin x``)."""
    return "\\" not in text and _CALL.search(text) is not None


def read_plain(text: str):
    """The SymPy expression of plain-syntax ``text``, or None when it is not one
    (an equation, a set, anything :func:`verifiers.sympy_tools.parse` refuses)."""
    import sympy

    try:
        expr = parse(text.strip().strip("$"))
    except (ToolInputError, TypeError, ValueError, ZeroDivisionError):
        return None
    # real symbols, as math-verify's LaTeX reader makes them: `sin(x)` is then `\sin x`
    return expr.xreplace({s: sympy.Symbol(s.name, real=True) for s in expr.free_symbols})


def vanishes_everywhere_tried(pred, gold) -> bool:
    """True when ``pred - gold`` is numerically zero at every one of :data:`POINTS` where both
    sides have a finite value (and there is at least one): SymPy's "not equal" is then
    unproven, not shown. False for anything but two SymPy expressions."""
    import sympy

    if not (isinstance(pred, sympy.Expr) and isinstance(gold, sympy.Expr)):
        return False
    symbols = sorted(pred.free_symbols | gold.free_symbols, key=lambda s: s.name)
    tried = 0
    for point in POINTS:
        at = {s: sympy.Rational(point) * (1 + sympy.Rational(173, 1000) * i) for i, s in enumerate(symbols)}
        p, g = _value(pred, at, sympy), _value(gold, at, sympy)
        if p is None or g is None:
            continue
        if abs(p - g) > TOLERANCE * (1 + abs(p) + abs(g)):
            return False
        tried += 1
    return tried > 0


def _value(expr, at: dict, sympy) -> complex | None:
    try:
        value = complex(sympy.N(expr.subs(at), 30))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError):
        return None
    return value if value == value and abs(value) != float("inf") else None
