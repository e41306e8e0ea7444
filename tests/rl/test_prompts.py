"""rl/prompts.py: the seed's four conditions, verbatim, and rendering through chat templates.

The expected strings are written out in full here (not built from the module's constants), from
``../shared/seed-experiment.md`` and the seed's own printed condition-D message. Rendering uses
the embedded model's tokenizer (SmolLM2's template) and a tiny Qwen3-style template; nothing is
downloaded.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest

from rl import prompts
from rl.records import Prompt

SYSTEM_AB = (
    "Evaluate the arithmetic expression using the symbol definitions provided. Be concise. "
    "Put your final answer in \\boxed{}."
)
SYSTEM_CD = (
    "You are an adapter that checks an API model's arithmetic answer. If the API answer is "
    "correct, respond with \\boxed{CORRECT}. If wrong or missing, compute the correct answer "
    "and respond with \\boxed{answer}. Use the symbol definitions to evaluate custom "
    "expressions. Be concise."
)
EXPLICIT = (
    "Custom arithmetic symbols:\n"
    "  θ means addition (+)\n"
    "  α means subtraction (-)\n"
    "  γ means multiplication (×)\n"
    "  β means division (÷)\n"
    "Precedence: β and γ bind tighter than θ and α (same as standard BODMAS)."
)
# The seed's printed condition-D user message, character for character.
SEED_D = (
    "The symbols θ, α, γ, β each represent one of the four basic arithmetic operations "
    "(+, -, ×, ÷). Each symbol maps to exactly one operation. Standard operator precedence "
    "(BODMAS) applies.\n\nExamples:\nExpression: 3 θ 4 | API answer: 7 → \\boxed{CORRECT}\n"
    "Expression: 10 α 3 | API answer: 5 → \\boxed{7}\n"
    "Expression: 2 γ 6 | API answer: none → \\boxed{12}\n\n"
    "Expression: 25 - 14 | API answer: 11 →\n/no_think"
)
EXPECTED_USER = {
    "A": EXPLICIT + "\n\nExamples:\n"
    "Expression: 3 θ 4 | API answer: 7 → \\boxed{7}\n"
    "Expression: 10 α 3 | API answer: 5 → \\boxed{7}\n"
    "Expression: 2 γ 6 | API answer: none → \\boxed{12}\n\n"
    "Expression: 25 - 14 | API answer: 11 →\n/no_think",
    "B": "Examples:\n"
    "Expression: 3 + 4 | API answer: 7 → \\boxed{7}\n"
    "Expression: 10 - 3 | API answer: 5 → \\boxed{7}\n\n"
    "Expression: 25 - 14 | API answer: 11 →\n/no_think",
    "C": EXPLICIT + "\n\nExamples:\n"
    "Expression: 3 θ 4 | API answer: 7 → \\boxed{CORRECT}\n"
    "Expression: 10 α 3 | API answer: 5 → \\boxed{7}\n"
    "Expression: 2 γ 6 | API answer: none → \\boxed{12}\n\n"
    "Expression: 25 - 14 | API answer: 11 →\n/no_think",
    "D": SEED_D,
}
EXPECTED_SYSTEM = {"A": SYSTEM_AB, "B": SYSTEM_AB, "C": SYSTEM_CD, "D": SYSTEM_CD}

# A Qwen3-style template: honours enable_thinking the way Qwen3's does (an empty think block).
QWEN3_LIKE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@pytest.mark.parametrize("condition", ["A", "B", "C", "D"])
def test_conditions_verbatim(condition):
    messages = prompts.adapter_messages("25 - 14", 11, condition, no_think_line=True)
    assert messages == [
        {"role": "system", "content": EXPECTED_SYSTEM[condition]},
        {"role": "user", "content": EXPECTED_USER[condition]},
    ]


def test_default_condition_is_d():
    assert prompts.adapter_messages("25 - 14", 11, no_think_line=True)[1]["content"] == SEED_D


@pytest.mark.parametrize("condition", ["A", "B"])
def test_correct_absent_without_it(condition):
    for m in prompts.adapter_messages("3 θ 4", 7, condition, no_think_line=True):
        assert "CORRECT" not in m["content"]


def test_api_answer_rendering():
    def last_line(api):
        user = prompts.user_message("7 β 2", api, "D", no_think_line=False)
        return user.splitlines()[-1]

    assert last_line(None) == "Expression: 7 β 2 | API answer: none →"
    assert last_line(-12) == "Expression: 7 β 2 | API answer: -12 →"
    assert last_line(Fraction(7, 2)) == "Expression: 7 β 2 | API answer: 7/2 →"
    assert last_line(Fraction(-3, 4)) == "Expression: 7 β 2 | API answer: -3/4 →"
    assert last_line(Fraction(8, 2)) == "Expression: 7 β 2 | API answer: 4 →"
    with pytest.raises(TypeError):
        prompts.format_api_answer(3.5)
    with pytest.raises(TypeError):
        prompts.format_api_answer(True)


def test_no_think_line_and_system_in_user():
    user = prompts.user_message("1 θ 2", 3, "D", no_think_line=False)
    assert user == SEED_D.replace("25 - 14 | API answer: 11", "1 θ 2 | API answer: 3")[
        : -len("\n/no_think")
    ]
    folded = prompts.adapter_messages("25 - 14", 11, "C", no_think_line=True, system_in_user=True)
    assert folded == [{"role": "user", "content": SYSTEM_CD + "\n\n" + EXPECTED_USER["C"]}]


def test_unknown_condition_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'E'.*\('A', 'B', 'C', 'D'\)"):
        prompts.adapter_messages("1 θ 2", 3, "E", no_think_line=False)


def test_gsm8k_strict_prompt():
    assert prompts.gsm8k_prompt("What is 6 times 7?") == (
        "Solve the math problem with concise reasoning. Write the final answer as the last "
        "non-empty line. That last line must look like this example: #### 42. Do not write "
        "anything after it.\n\nProblem:\nWhat is 6 times 7?\n\nSolution:"
    )


# ------------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def smol_tokenizer():
    from actors.models import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def qwen3_like(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = QWEN3_LIKE
    return tok


def test_render_smollm2(smol_tokenizer):
    tok = smol_tokenizer
    assert not prompts.supports_thinking(tok)
    p = prompts.adapter_prompt(tok, "25 α 14", None, response_prefix="\\boxed{")
    assert isinstance(p, Prompt) and p.response_prefix == "\\boxed{"
    # No thinking mode: no /no_think line; the template's own layout, then the prefix.
    user = prompts.user_message("25 α 14", None, "D", no_think_line=False)
    assert p.text == (
        f"<|im_start|>system\n{SYSTEM_CD}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{"
    )
    assert "/no_think" not in p.text
    # Ids are the tokenization of the whole text, one BOS (SmolLM2's BOS is <|im_start|>).
    assert p.token_ids == tok(p.text, add_special_tokens=False)["input_ids"]
    assert p.token_ids[0] == tok.bos_token_id and p.token_ids[1] != tok.bos_token_id
    assert tok.decode(p.token_ids) == p.text
    # Without a prefix the ids equal the template's own tokenization.
    messages = prompts.adapter_messages("25 α 14", None, no_think_line=False)
    plain = prompts.render(tok, messages)
    ref = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert plain.token_ids == list(ref)
    with pytest.raises(ValueError, match="no thinking mode"):
        prompts.render(tok, messages, thinking=True)


def test_render_qwen3_like(qwen3_like):
    tok = qwen3_like
    assert prompts.supports_thinking(tok)
    p = prompts.adapter_prompt(tok, "25 - 14", 11, response_prefix="\\boxed{")
    assert p.text == (
        f"<|im_start|>system\n{SYSTEM_CD}<|im_end|>\n<|im_start|>user\n{SEED_D}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n\\boxed{"
    )
    messages = prompts.adapter_messages("25 - 14", 11, no_think_line=True)
    thinking = prompts.render(tok, messages, thinking=True)
    assert thinking.text.endswith("<|im_start|>assistant\n") and "<think>" not in thinking.text
    # model.chat_template_thinking: true -- no /no_think line, no empty think block
    on = prompts.adapter_prompt(tok, "25 - 14", 11, response_prefix="\\boxed{", thinking=True)
    assert "/no_think" not in on.text and "<think>" not in on.text and on.text.endswith("assistant\n\\boxed{")


def test_render_system_in_user(smol_tokenizer):
    messages = prompts.adapter_messages("1 θ 2", 3, no_think_line=False, system_in_user=True)
    p = prompts.render(smol_tokenizer, messages)
    assert p.text.count("<|im_start|>user\n" + SYSTEM_CD + "\n\n") == 1


class _BosTokenizer:
    """A stand-in whose template writes BOS and whose tokenizer adds one too."""

    bos_token_id = 1
    chat_template = "{{ '<s>' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<s>" + "".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens):
        ids = [1 if text.startswith("<s>") else 5] + [7] * len(text.removeprefix("<s>"))
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_bos_not_doubled():
    tok = _BosTokenizer()
    assert prompts.render(tok, [{"role": "user", "content": "ab"}]).token_ids == [1, 7, 7]
    assert prompts.render_text(tok, "<s>ab").token_ids == [1, 7, 7]
    assert prompts.render_text(tok, "ab").token_ids == [1, 5, 7, 7]


def test_render_text_gsm8k(smol_tokenizer):
    text = prompts.gsm8k_prompt("What is 6 times 7?")
    p = prompts.render_text(smol_tokenizer, text)
    assert p.text == text and p.response_prefix == ""
    assert smol_tokenizer.decode(p.token_ids) == text


def test_rewrite_format_restates_the_expression_in_every_example():
    from rl import prompts

    assert prompts.examples("D", "rewrite") == (
        "Expression: 3 θ 4 | API answer: 7 → 3 + 4 = 7 → \\boxed{CORRECT}",
        "Expression: 10 α 3 | API answer: 5 → 10 - 3 = 7 → \\boxed{7}",
        "Expression: 2 γ 6 | API answer: none → 2 * 6 = 12 → \\boxed{12}")
    assert prompts.examples("A", "rewrite")[0].endswith("3 + 4 = 7 → \\boxed{7}")  # no CORRECT in A
    assert prompts.examples("D") == prompts.examples("D", "box")  # the seed's lines by default
    text = prompts.user_message("5 β 5", 1, "D", no_think_line=False, answer_format="rewrite")
    assert "2 * 6 = 12 → \\boxed{12}" in text and text.endswith("Expression: 5 β 5 | API answer: 1 →")
    assert prompts.answer_text("8 β 2", 4, use_correct=True, answer_format="rewrite") == "8 / 2 = 4 → \\boxed{CORRECT}"
    assert prompts.answer_text("8 β 2", None, use_correct=True) == "\\boxed{4}"
    with pytest.raises(ValueError, match="answer_format"):
        prompts.answer_text("1 + 1", 2, use_correct=True, answer_format="essay")


def test_prompts_written_with_another_symbol_map():
    from rl import prompts
    from verifiers.symbols import SymbolMap

    symbols = SymbolMap.permuted("λμσφ", "*/+-")
    assert prompts.definitions("explicit", symbols) == (
        "Custom arithmetic symbols:", "  λ means multiplication (×)", "  μ means division (÷)",
        "  σ means addition (+)", "  φ means subtraction (-)",
        "Precedence: μ and λ bind tighter than σ and φ (same as standard BODMAS).")
    assert prompts.definitions("vague", symbols)[0].startswith("The symbols λ, μ, σ, φ each represent")
    assert prompts.examples("D", "rewrite", symbols) == (  # the seed's shots, the map's meanings
        "Expression: 3 λ 4 | API answer: 7 → 3 * 4 = 12 → \\boxed{12}",
        "Expression: 10 μ 3 | API answer: 5 → 10 / 3 = 10/3 → \\boxed{10/3}",
        "Expression: 2 σ 6 | API answer: none → 2 + 6 = 8 → \\boxed{8}")
    assert prompts.answer_text("9 φ 2", 7, use_correct=True, answer_format="rewrite", symbols=symbols) == \
        "9 - 2 = 7 → \\boxed{CORRECT}"
    with pytest.raises(ValueError, match="definitions kind"):
        prompts.definitions("loose")
