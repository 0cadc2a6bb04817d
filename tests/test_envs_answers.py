"""Answer extraction and comparison through math-verify, and the built-in reward functions built on it."""

from __future__ import annotations

import threading

import pytest

from chatrl.envs import answers
from chatrl.envs.answers import answers_match, extract_answer
from chatrl.envs.rewards import BUILTIN_REWARD_FUNCTIONS, answer_match, format_check, format_check_fn, length_penalty


@pytest.mark.parametrize("reply", ["85", "85.0", "$85$", "\\boxed{85}", "The answer is 85.", "So the total is 85",
                                   "Final answer: 85", "The answer is $85.00", "x = 85", "Step 1: 80 + 5 = 85"])
def test_the_same_number_written_many_ways_matches(reply: str) -> None:
    assert answers_match(reply, "85")


@pytest.mark.parametrize(("reply", "expected"), [("1/2", "0.5"), ("0.5", "1/2"), ("$\\frac{1}{2}$", "0.5"),
                                                 ("The answer is 1,000.", "1000"), ("1000", "1,000"),
                                                 ("The answer is -12.", "-12"), ("It is 2.50 dollars", "2.5")])
def test_equal_values_in_other_notations_match(reply: str, expected: str) -> None:
    assert answers_match(reply, expected)


@pytest.mark.parametrize("reply", ["84", "The answer is 86.", "", "I don't know.", "eighty-five", "-85", "850"])
def test_wrong_or_missing_answers_do_not_match(reply: str) -> None:
    assert not answers_match(reply, "85")


def test_the_last_answer_counts_not_an_earlier_mention() -> None:
    # math-verify takes the rightmost match of a kind: the right number said early does not count
    assert not answers_match("At first I thought 85, but after checking it is 90.", "85")
    assert answers_match("At first I thought 85, but after checking it is 90.", "90")
    assert not answers_match("The answer is 85. Actually the answer is 90.", "85")


def test_an_answer_anchored_match_beats_a_later_bare_number() -> None:
    # pinned math-verify behaviour: "the answer is X" outranks a bare number that comes after it
    reply = "The answer is 85. I checked it 3 times."
    assert answers_match(reply, "85")
    assert not answers_match(reply, "3")
    assert extract_answer(reply) == "85"


def test_extract_answer() -> None:
    assert extract_answer("We add them: 3 + 4 = 7. The answer is 7.") == "7"
    assert extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("I have no idea.") is None
    assert extract_answer("") is None


def test_an_absurdly_long_reply_is_judged_by_its_end() -> None:
    reply = "Let me think. " + "blah 13 " * 2000 + "So the answer is 42."
    assert answers_match(reply, "42")
    assert extract_answer(reply) == "42"
    assert not answers_match("The answer is 42. " + "blah " * 2000, "42")  # the start is cut off


def test_works_off_the_main_thread() -> None:
    # math-verify's signal-based timeout raises ValueError outside the main thread unless disabled
    out: list[bool] = []
    thread = threading.Thread(target=lambda: out.append(answers_match("The answer is 7.", "7")))
    thread.start()
    thread.join()
    assert out == [True]


def test_math_verify_failures_mean_no_match(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("sympy blew up")

    monkeypatch.setattr(answers, "verify", explode)
    assert answers_match("85", "85") is False


def test_answer_match_reward() -> None:
    responses = ["The answer is 7.", "It is 8.", "7", "7"]
    assert answer_match([None] * 4, responses, reference=["7", "7", None, "7.0"]) == [1.0, 0.0, 0.0, 1.0]


def test_format_check_rewards_a_final_answer_sentence_at_the_end() -> None:
    responses = ["3 + 4 = 7. The answer is 7.", "The answer is \\boxed{7}", "7",
                 "The answer is 7. Let me know if there is anything else I can help you with today!", ""]
    assert format_check([None] * 5, responses) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert format_check_fn(r"^\d+$")([None, None], ["42", "forty-two"]) == [1.0, 0.0]


def test_length_penalty_and_the_builtin_table() -> None:
    assert length_penalty([None, None], ["a", ""], response_ids=[[1] * 50, []]) == [-0.5, -0.0]
    assert set(BUILTIN_REWARD_FUNCTIONS) == {"answer_match", "format_check", "length_penalty"}
    assert BUILTIN_REWARD_FUNCTIONS["answer_match"] is answer_match


@pytest.mark.parametrize(("reply", "expected", "match"), [
    ("To calculate 73 + 60, we need to add the numbers", "133", False),  # restating the problem is no answer
    ("What is 84 - 15", "69", False),
    ("73 * 60", "4380", False),
    ("73 + 60 = 133", "133", True),
    ("84 - 15 = 69", "69", True),
    ("3/4", "0.75", True),
    ("-1/2", "-0.5", True),
])
def test_a_numeric_gold_needs_a_number_not_the_problem_restated(reply: str, expected: str, match: bool) -> None:
    """math-verify evaluates expressions, so `73 + 60` equals 133; a GRPO run on that reward learned to restate the
    question (100% "success" with no sum computed). A numeric gold answer now needs a numeric final answer."""
    assert answers_match(reply, expected) is match
