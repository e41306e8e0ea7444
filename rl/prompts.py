"""The adapter's prompt (the seed's four conditions), the GSM8K strict prompt, and rendering.

The adapter prompt
------------------
Chat messages, reproduced from the seed (``../shared/seed-experiment.md``, "The adapter's
prompt"): a system message, then a user message whose lines are joined with ``\\n``::

    [definitions, "", "Examples:", example lines..., "",
     "Expression: {expression} | API answer: {api} →", "/no_think"]

========= =========== ======= ==========================================
condition definitions CORRECT examples
========= =========== ======= ==========================================
A         explicit    no      3 θ 4 → 7; 10 α 3 → 7; 2 γ 6 → 12
B         none        no      3 + 4 → 7; 10 - 3 → 7 (no definitions, no blank line)
C         explicit    yes     3 θ 4 → CORRECT; 10 α 3 → 7; 2 γ 6 → 12
D         vague       yes     as C (the seed's trained condition; the default)
========= =========== ======= ==========================================

``{api}`` is the upstream's answer: an integer, a fraction ``a/b`` (our extension: the seed's
upstream answers were integers), or ``none`` when it gave none.

Thinking mode
-------------
The seed ran Qwen3 with *both* the ``/no_think`` line and ``enable_thinking=False`` in the chat
template. :func:`render` passes ``enable_thinking`` only to templates that mention it (Qwen3
style); other templates would ignore or choke on it. :func:`adapter_prompt` adds the
``/no_think`` line only for such templates: for a model without a thinking mode (SmolLM2, the
embedded default) the line is noise the model was never trained on, so it is left out.
:func:`adapter_messages` takes ``no_think_line`` explicitly for callers that decide themselves.

Tokens
------
:func:`render` tokenizes the *full* text (template output + response prefix) in one call, so the
ids are exactly what re-tokenizing the text gives (no seam at the prefix), with
``add_special_tokens=False``: chat templates write their own BOS where the model wants one (as
``apply_chat_template(tokenize=True)`` does). A doubled BOS at the start is collapsed to one.
Raw-text prompts (GSM8K, no chat template) go through :func:`render_text`, which lets the
tokenizer add its BOS as in pretraining. No torch here: the tokenizer is duck-typed.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Literal

from rl.records import Prompt
from verifiers.symbols import SEED_SYMBOLS, SymbolMap, evaluate, to_standard

Condition = Literal["A", "B", "C", "D"]
CONDITIONS: tuple[str, ...] = ("A", "B", "C", "D")

SYSTEM_PLAIN = (
    "Evaluate the arithmetic expression using the symbol definitions provided. Be concise. "
    "Put your final answer in \\boxed{}."
)
"""The system prompt without CORRECT (conditions A, B)."""

SYSTEM_CORRECT = (
    "You are an adapter that checks an API model's arithmetic answer. If the API answer is "
    "correct, respond with \\boxed{CORRECT}. If wrong or missing, compute the correct answer and "
    "respond with \\boxed{answer}. Use the symbol definitions to evaluate custom expressions. "
    "Be concise."
)
"""The system prompt with CORRECT (conditions C, D)."""

_OP_NAMES = {"+": ("addition", "+"), "-": ("subtraction", "-"), "*": ("multiplication", "×"),
             "/": ("division", "÷")}


def definitions(kind: str, symbols: SymbolMap = SEED_SYMBOLS) -> tuple[str, ...]:
    """The definition lines (``explicit``, ``vague`` or ``none``) of a symbol map, its symbols
    in the map's order; for the seed's map they are the seed's lines."""
    if kind == "none":
        return ()
    names = list(symbols.custom)
    if kind == "vague":
        return (f"The symbols {', '.join(names)} each represent one of the four basic arithmetic operations "
                "(+, -, ×, ÷). Each symbol maps to exactly one operation. Standard operator precedence "
                "(BODMAS) applies.",)
    if kind != "explicit":
        raise ValueError(f"definitions kind {kind!r} is not one of explicit, vague, none")
    s = symbols.symbol_for
    return ("Custom arithmetic symbols:",
            *(f"  {name} means {_OP_NAMES[op][0]} ({_OP_NAMES[op][1]})" for name, op in symbols.custom.items()),
            f"Precedence: {s('/')} and {s('*')} bind tighter than {s('+')} and {s('-')} (same as standard BODMAS).")


AnswerFormat = Literal["box", "rewrite"]
ANSWER_FORMATS: tuple[str, ...] = ("box", "rewrite")

# The seed's few-shot items: (expression, API answer); ``{0}``..``{2}`` are the map's first three
# symbols (θ α γ for the seed's map: β is never shown).
_CUSTOM_SHOTS = (("3 {0} 4", 7), ("10 {1} 3", 5), ("2 {2} 6", None))
_STANDARD_SHOTS = (("3 + 4", 7), ("10 - 3", 5))


def answer_text(expression: str, api_answer: Fraction | int | None, *, use_correct: bool,
                answer_format: str = "box", symbols: SymbolMap = SEED_SYMBOLS) -> str:
    """The reply the adapter should give: ``\\boxed{CORRECT}`` when ``use_correct`` and the API
    answer is right, else ``\\boxed{value}``; the ``rewrite`` format first restates the
    expression with standard operators and its value (``3 + 4 = 7 → \\boxed{CORRECT}``), a short
    reasoning step in which the symbol's meaning is one token.

    >>> answer_text("10 α 3", 5, use_correct=True, answer_format="rewrite")
    '10 - 3 = 7 → \\\\boxed{7}'
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format {answer_format!r} is not one of {ANSWER_FORMATS}")
    value = evaluate(expression, symbols)
    keep = use_correct and api_answer is not None and Fraction(api_answer) == value
    box = "\\boxed{CORRECT}" if keep else f"\\boxed{{{format_api_answer(value)}}}"
    if answer_format == "box":
        return box
    return f"{to_standard(expression, symbols)} = {format_api_answer(value)} → {box}"


def _examples(shots, *, use_correct: bool, answer_format: str, symbols: SymbolMap) -> tuple[str, ...]:
    lines = []
    for template, api in shots:
        expression = template.format(*symbols.custom)
        text = answer_text(expression, api, use_correct=use_correct, answer_format=answer_format, symbols=symbols)
        lines.append(f"Expression: {expression} | API answer: {format_api_answer(api)} → {text}")
    return tuple(lines)


# condition -> (system prompt, definitions kind, few-shot items, whether CORRECT is used)
_CONDITIONS: dict[str, tuple[str, str, tuple, bool]] = {
    "A": (SYSTEM_PLAIN, "explicit", _CUSTOM_SHOTS, False),
    "B": (SYSTEM_PLAIN, "none", _STANDARD_SHOTS, False),
    "C": (SYSTEM_CORRECT, "explicit", _CUSTOM_SHOTS, True),
    "D": (SYSTEM_CORRECT, "vague", _CUSTOM_SHOTS, True),
}

NO_THINK = "/no_think"
BOXED_PREFIX = "\\boxed{"
"""The response prefix that makes the adapter answer at once (``rollout.response_prefix``)."""

GSM8K_STRICT = (
    "Solve the math problem with concise reasoning. Write the final answer as the last "
    "non-empty line. That last line must look like this example: #### 42. Do not write "
    "anything after it.\n\nProblem:\n{question}\n\nSolution:"
)
"""The answer-boundary lab's strict final-line prompt (raw text, no chat template)."""


def format_api_answer(answer: Fraction | int | None) -> str:
    """``7`` -> ``"7"``, ``Fraction(-3, 4)`` -> ``"-3/4"``, ``Fraction(6, 3)`` -> ``"2"``,
    ``None`` -> ``"none"``.

    >>> format_api_answer(Fraction(10, 4)), format_api_answer(None)
    ('5/2', 'none')
    """
    if answer is None:
        return "none"
    if isinstance(answer, bool) or not isinstance(answer, (int, Fraction)):
        raise TypeError(f"API answer must be an int, a Fraction or None, got {answer!r}")
    return str(Fraction(answer))  # str(Fraction) is "a/b", or "a" when b == 1


def system_prompt(condition: str = "D") -> str:
    return _condition(condition)[0]


def uses_correct(condition: str) -> bool:
    """Whether the condition offers ``\\boxed{CORRECT}`` (C and D)."""
    return _condition(condition)[3]


def examples(condition: str = "D", answer_format: str = "box", symbols: SymbolMap = SEED_SYMBOLS) -> tuple[str, ...]:
    """The condition's few-shot lines in the answer format, written with ``symbols``."""
    _, _, shots, correct = _condition(condition)
    return _examples(shots, use_correct=correct, answer_format=answer_format, symbols=symbols)


def user_message(
    expression: str, api_answer: Fraction | int | None, condition: str = "D", *,
    no_think_line: bool, answer_format: str = "box", symbols: SymbolMap = SEED_SYMBOLS,
) -> str:
    """The user message's text: the seed's lines joined with ``\\n`` (definitions and few-shot
    lines written with ``symbols``, the seed's map unless a caller teaches on another)."""
    lines = list(definitions(_condition(condition)[1], symbols))
    lines += [""] if lines else []
    lines += ["Examples:", *examples(condition, answer_format, symbols), ""]
    lines.append(f"Expression: {expression} | API answer: {format_api_answer(api_answer)} →")
    if no_think_line:
        lines.append(NO_THINK)
    return "\n".join(lines)


def adapter_messages(
    expression: str, api_answer: Fraction | int | None, condition: str = "D", *,
    no_think_line: bool, system_in_user: bool = False, answer_format: str = "box",
    symbols: SymbolMap = SEED_SYMBOLS,
) -> list[dict[str, str]]:
    """The adapter's chat messages for one item.

    ``system_in_user`` folds the system prompt into the user turn (system, blank line, user
    text) for runs that sent a single user message; templates that insert a default system
    message (SmolLM2's does) will then add theirs.
    """
    system = system_prompt(condition)
    user = user_message(expression, api_answer, condition, no_think_line=no_think_line,
                        answer_format=answer_format, symbols=symbols)
    if system_in_user:
        return [{"role": "user", "content": f"{system}\n\n{user}"}]
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def gsm8k_prompt(question: str) -> str:
    """The strict final-line prompt for one GSM8K question (raw text)."""
    return GSM8K_STRICT.format(question=question)


# ------------------------------------------------------------------------------- rendering


def chat_template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template as text ('' when it has none); named templates joined."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def supports_thinking(tokenizer: Any) -> bool:
    """Whether the chat template has a thinking switch (Qwen3-style ``enable_thinking``)."""
    return "enable_thinking" in chat_template_text(tokenizer)


def render(
    tokenizer: Any, messages: list[dict[str, str]], response_prefix: str = "", *,
    thinking: bool = False,
) -> Prompt:
    """Render chat messages into a :class:`Prompt` ready for generation.

    The template is applied with ``add_generation_prompt=True`` (and ``enable_thinking`` when
    the template has that switch), then ``response_prefix`` is appended to the text; the whole
    text is tokenized at once (see the module docstring).
    """
    if not chat_template_text(tokenizer):
        raise ValueError("the tokenizer has no chat template; use render_text for raw prompts")
    kwargs: dict[str, Any] = {}
    if supports_thinking(tokenizer):
        kwargs["enable_thinking"] = thinking
    elif thinking:
        raise ValueError("thinking=True, but this chat template has no thinking mode")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    text += response_prefix
    ids = _collapse_bos(tokenizer, _ids(tokenizer, text, add_special_tokens=False))
    return Prompt(token_ids=ids, text=text, response_prefix=response_prefix)


def render_text(tokenizer: Any, text: str) -> Prompt:
    """A raw-text prompt (no chat template), tokenized with the tokenizer's own special tokens
    (its BOS, if it adds one)."""
    ids = _collapse_bos(tokenizer, _ids(tokenizer, text, add_special_tokens=True))
    return Prompt(token_ids=ids, text=text, response_prefix="")


def adapter_prompt(
    tokenizer: Any, expression: str, api_answer: Fraction | int | None, condition: str = "D", *,
    response_prefix: str = "", system_in_user: bool = False, answer_format: str = "box",
    symbols: SymbolMap = SEED_SYMBOLS, thinking: bool = False,
) -> Prompt:
    """:func:`adapter_messages` rendered with :func:`render`. Thinking off (the seed's Qwen3
    setup, ``model.chat_template_thinking: false``): the ``/no_think`` line is included exactly
    when the template has a thinking mode. ``thinking=True`` needs such a template."""
    messages = adapter_messages(
        expression, api_answer, condition,
        no_think_line=supports_thinking(tokenizer) and not thinking, system_in_user=system_in_user,
        answer_format=answer_format, symbols=symbols,
    )
    return render(tokenizer, messages, response_prefix, thinking=thinking)


def _condition(condition: str) -> tuple[str, str, tuple, bool]:
    try:
        return _CONDITIONS[condition]
    except KeyError:
        raise ValueError(f"condition {condition!r} is not one of {CONDITIONS}") from None


def _ids(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _collapse_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """A template that writes BOS itself plus a tokenizer that adds one gives two: keep one."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        return ids[1:]
    return ids
