from fractions import Fraction

import pytest

from verifiers.answers import (
    GSM8K_BUCKETS,
    extract_boxed,
    find_numbers,
    gsm8k_gold,
    parse_api_answer,
    parse_number,
    resolve_adapter_answer,
    score_gsm8k,
    stop_aware,
)


@pytest.mark.parametrize(
    "text, content",
    [
        (r"\boxed{12}", "12"),
        (r"a \boxed{1} b \boxed{2} c", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{{a}{b}}", "{a}{b}"),
        (r"\boxed{\text{CORRECT}}", r"\text{CORRECT}"),
        (r"\boxed {7}", "7"),
        (r"\boxed{3} and \boxed{4", "3"),  # unterminated last box is ignored
        (r"\boxed{1 \boxed{2}}", r"1 \boxed{2}"),  # the box that closes last
        (r"} \boxed{5} }", "5"),
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxed{12", None),
        (r"\boxed 12", None),
        ("", None),
    ],
)
def test_extract_boxed(text, content):
    assert extract_boxed(text) == content


@pytest.mark.parametrize(
    "text, api, expected",
    [
        (r"\boxed{CORRECT}", Fraction(7), 7),
        (r"\boxed{correct}", 7, 7),
        (r"\boxed{ Correct }", 7, 7),
        (r"\boxed{\text{CORRECT}}", 7, 7),
        (r"\boxed{\text{ correct }}", 7, 7),
        (r"\boxed{CORRECT}", 0, 0),  # an API answer of 0 is an answer
        (r"\boxed{CORRECT}", None, None),  # the API gave none
        (r"\boxed{INCORRECT}", 7, None),
        (r"\boxed{incorrect}", 7, None),
        (r"\boxed{NOT CORRECT}", 7, None),
        (r"\boxed{CORRECT!}", 7, None),
        (r"The API is CORRECT", 7, None),  # no box, no answer
        (r"\boxed{12}", 7, 12),
        (r"\boxed{-12}", 7, -12),
        (r"\boxed{+12}", 7, 12),
        (r"\boxed{−12}", 7, -12),  # unicode minus
        (r"\boxed{1,872}", None, 1872),
        (r"\boxed{1,234,567}", None, 1234567),
        (r"\boxed{1,87}", None, None),  # not a thousands separator
        (r"\boxed{7.0}", None, 7),
        (r"\boxed{7.50}", None, Fraction(15, 2)),
        (r"\boxed{7/2}", None, Fraction(7, 2)),
        (r"\boxed{-7/2}", None, Fraction(-7, 2)),
        (r"\boxed{\frac{7}{2}}", None, Fraction(7, 2)),
        (r"\boxed{-\frac{14}{4}}", None, Fraction(-7, 2)),
        (r"\boxed{\dfrac{7}{2}}", None, Fraction(7, 2)),
        (r"\boxed{7/0}", None, None),
        (r"\boxed{$12$}", None, 12),
        (r"\boxed{\boxed{5}}", None, 5),
        (r"\boxed{12 apples}", None, None),
        (r"\boxed{12} then \boxed{CORRECT}", 3, 3),  # the last box decides
        (r"\boxed{CORRECT} no wait \boxed{13}", 3, 13),
        ("12", None, None),
    ],
)
def test_resolve_adapter_answer(text, api, expected):
    result = resolve_adapter_answer(text, api)
    assert result == (None if expected is None else Fraction(expected))
    assert result is None or isinstance(result, Fraction)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", 42),
        ("-23", -23),
        ("  1,872 \n", 1872),
        ("The answer is 35.", 35),
        ("78 α 43 α 58 = -23", -23),
        ("= −5", -5),
        ("5 - 3", 3),  # subtraction, not the number -3
        ("7 / 2", Fraction(7, 2)),
        ("3.5", Fraction(7, 2)),
        ("First 3\nthen 4\n\n", 4),  # the last non-empty line
        ("12 is the answer.\nDone.", None),  # the last line has no number
        ("", None),
        ("   \n  ", None),
        ("I cannot compute θ.", None),
        (None, None),
    ],
)
def test_parse_api_answer(text, expected):
    assert parse_api_answer(text) == (None if expected is None else Fraction(expected))


def test_huge_numbers_are_not_read():
    assert parse_number("9" * 5000) is None
    assert parse_api_answer("9" * 5000) is None
    assert parse_number("9" * 900) == int("9" * 900)


def test_find_numbers():
    assert find_numbers("x2 and 3.5, then -4 and 10-2, 1,000") == [Fraction(7, 2), -4, 10, 2, 1000]


# --- GSM8K answer-boundary metrics ---------------------------------------------------


@pytest.mark.parametrize(
    "completion, gold, bucket, exact, final_format, strict, trailing",
    [
        ("3 + 4 = 7\n#### 7", 7, "correct_clean_contract", True, True, True, False),
        ("#### 7\n\n", 7, "correct_clean_contract", True, True, True, False),
        ("So the answer is #### 7", 7, "correct_marker_not_final_line", True, True, False, False),
        ("#### 7\nThanks!", 7, "correct_with_trailing_text", True, True, False, True),
        ("#### 7 dollars", 7, "correct_with_trailing_text", True, True, False, True),
        ("The total is 7.", 7, "correct_without_marker", True, False, False, False),
        (r"\boxed{7} and then 9", 7, "correct_without_marker", True, False, False, False),
        ("#### 8", 7, "wrong_math_clean_contract", False, True, True, False),
        ("The total is 8.", 7, "wrong_missing_marker", False, False, False, False),
        ("The answer: #### 8", 7, "wrong_marker_not_final_line", False, True, False, False),
        ("#### 8\nmore", 7, "wrong_with_trailing_text", False, True, False, True),
        ("I do not know.", 7, "wrong_missing_answer", False, False, False, False),
        ("", 7, "wrong_missing_answer", False, False, False, False),
        ("#### $1,018", 1018, "correct_clean_contract", True, True, True, False),
        ("#### 50%", 50, "correct_clean_contract", True, True, True, False),
        ("#### 7.000000000001", 7, "correct_clean_contract", True, True, True, False),  # within 1e-9
        ("#### 7.00001", 7, "wrong_math_clean_contract", False, True, True, False),
        ("#### 7\n#### 9", 7, "correct_with_trailing_text", True, True, True, True),  # first marker wins
    ],
)
def test_score_gsm8k(completion, gold, bucket, exact, final_format, strict, trailing):
    score = score_gsm8k(completion, gold)
    assert score.bucket == bucket
    assert (score.exact, score.final_format, score.strict_final_line, score.trailing_text) == (
        exact, final_format, strict, trailing)
    assert score.bucket in GSM8K_BUCKETS


def test_gsm8k_prediction_order():
    # marker first, then the FIRST box, then the last number
    assert score_gsm8k(r"\boxed{3} \boxed{4} #### 5", 5).predicted == 5
    assert score_gsm8k(r"\boxed{3} \boxed{4} 9", 3).predicted == 3
    assert score_gsm8k("2 then 3 then 4", 4).predicted == 4


def test_gsm8k_gold_reader():
    assert gsm8k_gold("blah <<3*4=12>>12\n#### 12") == 12
    assert gsm8k_gold("#### 1 #### -3.5") == Fraction(-7, 2)
    assert score_gsm8k("#### 12", "work\n#### 12").exact
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker 12")
    with pytest.raises(ValueError, match="not a number"):
        score_gsm8k("#### 1", "abc")


def test_stop_aware():
    assert stop_aware("work\n#### 5 and more\nUser: hi") == "work\n#### 5"
    assert stop_aware("work\nProblem: next\n#### 5") == "work"
    assert stop_aware("no marker") == "no marker"
    assert score_gsm8k(stop_aware("#### 5\nUser: thanks"), 5).bucket == "correct_clean_contract"
