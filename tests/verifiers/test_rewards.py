from fractions import Fraction

import pytest

from verifiers.rewards import (
    REWARDS,
    SHAPED_WEIGHTS,
    Example,
    adapter_reward,
    binary_reward,
    get_reward,
    shaped_reward,
)


@pytest.mark.parametrize(
    "completion, truth, api, reward",
    [
        (r"\boxed{CORRECT}", 7, 7, 1.0),
        (r"\boxed{CORRECT}", 7, 8, 0.0),
        (r"\boxed{CORRECT}", 7, None, 0.0),
        (r"\boxed{CORRECT}", 0, 0, 1.0),
        (r"\boxed{7}", 7, 8, 1.0),
        (r"\boxed{7.0}", 7, None, 1.0),
        (r"\boxed{INCORRECT}", 7, 7, 0.0),
        ("7", 7, 7, 0.0),  # no box, no reward
        (r"\boxed{-1006}", -1006, None, 1.0),
    ],
)
def test_binary_reward(completion, truth, api, reward):
    assert binary_reward(completion, truth, api) == reward


def test_adapter_diagnostics():
    result = adapter_reward(r"\boxed{12} because 3 × 4", Example(12, api_answer=5))
    assert (result.reward, result.answer, result.format_ok, result.trailing_text) == (1.0, 12, True, True)
    result = adapter_reward(r"\boxed{twelve}", Example(12))
    assert (result.reward, result.answer, result.format_ok) == (0.0, None, False)
    result = adapter_reward(r"\boxed{CORRECT}", Example(12, api_answer=None))
    assert (result.answer, result.format_ok, result.trailing_text) == (None, True, False)


def test_registry_lists_valid_names_on_typo():
    assert get_reward("binary") is adapter_reward
    with pytest.raises(KeyError, match="did you mean 'binary'") as info:
        get_reward("binnary")
    for name in REWARDS:
        assert name in str(info.value)


def test_shaped_reward_is_correctness_gated():
    good = "16 - 3 - 4 = 9 eggs\n9 * 2 = 18 dollars\n#### 18"
    example = Example("#### 18", question="16 eggs, eats 3, bakes with 4, sells at $2")
    right = shaped_reward(good, example)
    assert right.reward == pytest.approx(0.6 + 0.4 * sum(
        SHAPED_WEIGHTS[k] * v for k, v in right.components.items()))
    assert 0.6 <= right.reward <= 1.0 and right.format_ok and right.answer == 18
    wrong = shaped_reward(good.replace("#### 18", "#### 19"), example)
    assert 0.1 <= wrong.reward <= 0.3 < right.reward
    bare_right = shaped_reward("18", example)
    assert bare_right.reward >= 0.6 > wrong.reward  # no style outscores being right
    assert set(right.components) == set(SHAPED_WEIGHTS)
    assert all(0.0 <= v <= 1.0 for v in right.components.values())
    assert sum(SHAPED_WEIGHTS.values()) == pytest.approx(1.0)


def test_shaped_components():
    example = Example(18, question="3 and 6")
    parts = shaped_reward("3 * 6 = 18\n3 * 6 = 18\n#### 18", example).components
    assert parts["self_consistency"] == 1.0 and parts["number_grounding"] == 1.0
    assert parts["repetition"] == pytest.approx(2 / 3)
    assert shaped_reward("#### 18", example).components["self_consistency"] == 0.0
    assert shaped_reward("#### 18 extra", example).components["format"] == 0.5
    assert shaped_reward("nothing", example).components["parsability"] == 0.0


def test_example_truth_types():
    assert get_reward("gsm8k_exact")("#### 3.5", Example(Fraction(7, 2))).reward == 1.0
    assert get_reward("gsm8k_exact")("#### 4", Example("x\n#### 4")).reward == 1.0
