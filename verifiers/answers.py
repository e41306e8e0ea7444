"""Reading answers out of model text: boxes, the adapter's verdict, the API's reply.

Every reader here runs in time linear in its input and never raises on arbitrary text
(hostile completions are the normal case in RL): "no answer" is ``None``. Numbers are read
exactly as :class:`fractions.Fraction`; a number with more than :data:`MAX_DIGITS` digits
is not read (Python refuses to convert such strings, and no task here needs them).

>>> extract_boxed(r"so \\boxed{\\frac{7}{2}} and")
'\\\\frac{7}{2}'
>>> resolve_adapter_answer(r"\\boxed{CORRECT}", Fraction(12))
Fraction(12, 1)
>>> resolve_adapter_answer(r"\\boxed{1,872}", None)
Fraction(1872, 1)
>>> parse_api_answer("78 α 43 α 58 = -23")
Fraction(-23, 1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_DIGITS = 1000

_BOX_OPEN = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
_WRAPPERS = re.compile(r"^\\(?:text|mathrm|textbf|mathbf|operatorname)\s*\{(.*)\}$", re.S)
_FRAC = re.compile(r"^([+-]?)\\d?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}$")
_SIGNED = r"[+\-−]?"
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_TOKEN = re.compile(rf"^({_SIGNED})({_UNSIGNED})\.?$")
# A sign counts only when it does not follow a digit or a closing bracket ("5-3" is a
# subtraction, not the number -3); a fraction is two numbers around a slash.
_NUMBER_IN_TEXT = re.compile(
    rf"(?<![\w.)\]}}])((?:(?<![\d)\]}}]\s)[+\-−])?{_UNSIGNED}(?:\s*/\s*\d+)?)(?![\d])"
)


def extract_boxed(text: str) -> str | None:
    r"""The content of the last complete ``\boxed{...}`` (the one that closes last).

    Nested braces are matched; an unterminated box is ignored. ``None`` when there is none.

    >>> extract_boxed(r"\boxed{1} then \boxed{{2}}")
    '{2}'
    >>> extract_boxed(r"\boxed{3} \boxed{4")
    '3'
    """
    span = last_box_span(text)
    return None if span is None else text[span[0] : span[1]]


def last_box_span(text: str) -> tuple[int, int] | None:
    """``(start, end)`` of the last complete box's content; ``text[end]`` is its ``}``."""
    if isinstance(text, str) and text.count("{") == 1:  # the common case: one flat box
        opening = _BOX_OPEN.search(text)
        close = text.find("}", opening.end()) if opening else -1
        return (opening.end(), close) if close >= 0 else None
    boxes = _complete_boxes(text)
    return boxes[-1] if boxes else None


def _complete_boxes(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every closed box's content, in closing order; one linear pass."""
    if not isinstance(text, str) or "\\boxed" not in text:
        return []
    openings = {m.end() - 1: m.end() for m in _BOX_OPEN.finditer(text)}
    stack: list[int] = []
    boxes: list[tuple[int, int]] = []
    for brace in _BRACE.finditer(text):  # a C-speed scan; Python sees only the braces
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            start = stack.pop()
            if start in openings:
                boxes.append((openings[start], brace.start()))
    return boxes


def parse_number(text: str) -> Fraction | None:
    r"""Read one number exactly: ``-12``, ``+7``, ``1,872``, ``7.0``, ``7.5``, ``7/2``,
    ``\frac{7}{2}``, optionally inside ``$...$`` or ``\text{...}``. Anything else: ``None``.

    >>> parse_number("-7/2"), parse_number("7.0"), parse_number("12 apples")
    (Fraction(-7, 2), Fraction(7, 1), None)
    """
    if not isinstance(text, str) or len(text) > 4 * MAX_DIGITS:
        return None
    text = _unwrap(text)
    frac = _FRAC.match(text)
    if frac:
        return _ratio(frac.group(1), frac.group(2), frac.group(3))
    if "/" in text:
        numerator, _, denominator = text.partition("/")
        sign = numerator.strip()[:1] if numerator.strip()[:1] in "+-−" else ""
        return _ratio(sign, numerator.strip().lstrip("+-−"), denominator)
    return _signed_value(text)


def _ratio(sign: str, numerator: str, denominator: str) -> Fraction | None:
    top, bottom = _signed_value(numerator), _signed_value(denominator)
    if top is None or bottom is None or bottom == 0:
        return None
    value = top / bottom
    return -value if sign in ("-", "−") else value


def _signed_value(text: str) -> Fraction | None:
    match = _NUMBER_TOKEN.match(text.strip())
    if not match or len(match.group(2)) > MAX_DIGITS:
        return None
    digits = match.group(2).replace(",", "")
    value = Fraction(digits) if "." in digits else Fraction(int(digits))
    return -value if match.group(1) in ("-", "−") else value


def _unwrap(text: str) -> str:
    r"""Strip spaces, ``$`` delimiters and ``\text{...}``-style wrappers."""
    text = text.strip()
    if "$" not in text and "\\" not in text:
        return text
    for _ in range(4):  # wrappers nest rarely; a fixed bound keeps this linear
        stripped = text.strip("$ ").strip()
        wrapped = _WRAPPERS.match(stripped)
        stripped = wrapped.group(1).strip() if wrapped else stripped
        if stripped == text:
            break
        text = stripped
    return text


def is_correct_token(box_content: str) -> bool:
    r"""True for ``CORRECT`` in any case, bare or as ``\text{CORRECT}``; never for INCORRECT."""
    return _unwrap(box_content).upper() == "CORRECT"


def resolve_adapter_answer(text: str, api_answer: Fraction | int | None) -> Fraction | None:
    r"""The adapter's final answer: its boxed number, or the API's answer for CORRECT.

    ``api_answer`` may be 0; ``None`` means the API gave no answer, and CORRECT then
    resolves to ``None``. No box (or a box that holds neither CORRECT nor one number): ``None``.

    >>> resolve_adapter_answer(r"\boxed{\text{correct}}", 0)
    Fraction(0, 1)
    >>> resolve_adapter_answer(r"\boxed{INCORRECT}", 5) is None
    True
    """
    return read_box(extract_boxed(text), api_answer)


def read_box(content: str | None, api_answer: Fraction | int | None) -> Fraction | None:
    """What a box's content resolves to (see :func:`resolve_adapter_answer`)."""
    if content is None:
        return None
    content = _unwrap(content)
    if content.upper() == "CORRECT":
        return None if api_answer is None else Fraction(api_answer)
    inner = extract_boxed(content)  # \\boxed{\\boxed{5}}: read the innermost
    return parse_number(inner if inner is not None else content)


def find_numbers(text: str) -> list[Fraction]:
    """Every number in ``text`` in order (signs, thousands separators, decimals, a/b)."""
    numbers = []
    for match in _NUMBER_IN_TEXT.finditer(text):
        value = parse_number(re.sub(r"\s+", "", match.group(1)))
        if value is not None:
            numbers.append(value)
    return numbers


def parse_api_answer(text: str | None) -> Fraction | None:
    """The API's reply to "evaluate this": a bare number, or the last number on the last
    non-empty line. ``None`` when there is none.

    >>> parse_api_answer("The result is 1,872.\\n")
    Fraction(1872, 1)
    >>> parse_api_answer("I cannot evaluate θ.") is None
    True
    """
    if not isinstance(text, str):
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    bare = parse_number(lines[-1])
    if bare is not None:
        return bare
    numbers = find_numbers(lines[-1][-8 * MAX_DIGITS :])
    return numbers[-1] if numbers else None


# --- GSM8K-style answers and the answer-boundary metrics ------------------------------
# Definitions follow the seed report "Honest results from a small GRPO lab".

GSM8K_STOP_STRINGS = ("\nHuman:", "\nUser:", "\nSystem:", "\nAssistant:", "\nProblem:")
_MARKER = re.compile(r"####[ \t]*\$?[ \t]*(-?[\d,]*\.?\d+)%?")
_LOOSE_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
GSM8K_BUCKETS = (
    "correct_clean_contract",
    "correct_marker_not_final_line",
    "correct_without_marker",
    "correct_with_trailing_text",
    "wrong_math_clean_contract",
    "wrong_missing_marker",
    "wrong_marker_not_final_line",
    "wrong_with_trailing_text",
    "wrong_missing_answer",
)


@dataclass(frozen=True)
class GSM8KScore:
    """The answer-boundary metrics of one completion.

    exact: the predicted number equals the gold within 1e-9 (first ``#### n`` marker,
    else the first ``\\boxed{}``, else the last number). final_format: a marker anywhere.
    strict_final_line: the last non-empty line is exactly ``#### n``. trailing_text:
    non-space text after the first marker. bucket: one of :data:`GSM8K_BUCKETS`.
    """

    exact: bool
    final_format: bool
    strict_final_line: bool
    trailing_text: bool
    bucket: str
    predicted: Fraction | None


def tolerant_number(text: str | None) -> Fraction | None:
    """A number after removing ``,`` ``$`` ``%`` and spaces (the lab's "tolerant rescore")."""
    if text is None:
        return None
    return parse_number(re.sub(r"[,$%\s]", "", text[: 4 * MAX_DIGITS]))


def gsm8k_gold(answer_field: str) -> Fraction:
    """The gold answer of a GSM8K row: the number after the last ``####``.

    >>> gsm8k_gold("She has 3 + 4 = <<3+4=7>>7 apples.\\n#### 1,007")
    Fraction(1007, 1)
    """
    head, marker, tail = answer_field.rpartition("####")
    value = tolerant_number(tail) if marker else None
    if value is None:
        raise ValueError(f"GSM8K answer field has no '#### number' at its end: {answer_field[-80:]!r}")
    return value


def stop_aware(completion: str) -> str:
    """Cut at the first of :data:`GSM8K_STOP_STRINGS`, then right after the first marker."""
    cut = min((i for s in GSM8K_STOP_STRINGS if (i := completion.find(s)) >= 0), default=len(completion))
    completion = completion[:cut]
    marker = _MARKER.search(completion)
    return completion[: marker.end()] if marker else completion


def _gsm8k_prediction(completion: str, marker: re.Match | None) -> Fraction | None:
    if marker:
        return tolerant_number(marker.group(1))
    boxes = _complete_boxes(completion)
    if boxes:
        start, end = min(boxes)  # the first box
        return tolerant_number(completion[start:end])
    numbers = _LOOSE_NUMBER.findall(completion[-8 * MAX_DIGITS :])
    return tolerant_number(numbers[-1]) if numbers else None


def score_gsm8k(completion: str, gold: Fraction | int | str) -> GSM8KScore:
    """Score one completion against a gold number (a GSM8K answer field is read too).

    >>> score_gsm8k("3 + 4 = 7\\n#### 7", 7).bucket
    'correct_clean_contract'
    >>> score_gsm8k("#### 7 because 3 + 4 = 7", 7).bucket
    'correct_with_trailing_text'
    """
    truth = gsm8k_gold(gold) if isinstance(gold, str) and "####" in gold else tolerant_number(str(gold))
    if truth is None:
        raise ValueError(f"gold answer is not a number: {gold!r}")
    marker = _MARKER.search(completion)
    predicted = _gsm8k_prediction(completion, marker)
    exact = predicted is not None and abs(predicted - truth) <= Fraction(1, 10**9)
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    strict = bool(lines) and _MARKER.fullmatch(lines[-1]) is not None
    trailing = bool(marker) and completion[marker.end() :].strip() != ""
    prefix = "correct" if exact else "wrong"
    if not marker:
        bucket = "correct_without_marker" if exact else (
            "wrong_missing_marker" if predicted is not None else "wrong_missing_answer")
    elif trailing:
        bucket = f"{prefix}_with_trailing_text"
    elif not strict:
        bucket = f"{prefix}_marker_not_final_line"
    else:
        bucket = "correct_clean_contract" if exact else "wrong_math_clean_contract"
    return GSM8KScore(exact, bool(marker), strict, trailing, bucket, predicted)
