"""A deterministic corpus of hostile strings for the verifiers' fuzz tests."""

import random

MEGABYTE = 1 << 20
_PIECES = [
    "\\boxed{", "}", "{", "\\boxed", "CORRECT", "INCORRECT", "\\text{", "\\frac{", "####", "#",
    "-", "−", "+", "/", ",", ".", "$", "%", "=", "^", "**", "9", "0", "1,000", "1e308", "θ", "α",
    "γ", "β", "×", "÷", " ", "\n", "\t", "\r", "\x00", "\x1b[31m", "\u202e", "\ufeff", "𝟗", "٣",
    "(", ")", "[", "]", "\\", "\\\\", "nan", "inf", "sqrt(", "x", "Problem:", "\nUser:",
]


def _big_ones() -> list[str]:
    return [
        "{" * 10_000,
        "\\boxed{" * 10_000,
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        "(" * 10_000 + "1" + ")" * 10_000,
        "9**9**9**9",
        "9^9^9^9",
        "2^(10^10)",
        "10**10**10",
        "\\boxed{9**9**9**9}",
        "#### " + "9" * 100_000,
        "\\boxed{" + "9" * 100_000 + "}",
        "1,000" * 50_000,
        "a" * MEGABYTE,
        "\\boxed{" * (MEGABYTE // 7),
        "}" * MEGABYTE,
        "9" * MEGABYTE,
        "1 θ " * (MEGABYTE // 4) + "1",
        "\\boxed{CORRECT" * 100_000,
        "\x00" * 100_000,
        "#### 1\n" * 100_000,
        "\n" * MEGABYTE,
    ]


def hostile_strings(n: int = 10_000, seed: int = 0) -> list[str]:
    """``n`` strings: the big hand-made ones, then random mixes of risky pieces and bytes."""
    rng = random.Random(seed)
    out = _big_ones()
    while len(out) < n:
        kind = rng.random()
        if kind < 0.6:
            out.append("".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 40))))
        elif kind < 0.8:
            out.append("".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 60))))
        else:
            depth = rng.randint(1, 3000)
            out.append("\\boxed{" * rng.randint(0, 3) + "{" * depth + str(rng.randint(-10**6, 10**6)) + "}" * rng.randint(0, depth))
    return out[:n]
