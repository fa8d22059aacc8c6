"""Each readability filter rejects a crafted bad sample and keeps a good one."""

from __future__ import annotations

import pytest

from posttrain.traces import filters

GOOD = "<think>\n3 + 4 = 7\n7 - 2 = 5\n</think>\nThe answer is \\boxed{5}."


def test_max_length_rejects_long_and_truncated_samples():
    assert filters.max_length(100, 100, "stop") is None
    assert filters.max_length(101, 100, "stop") == "101 tokens > 100"
    assert filters.max_length(20, 100, "length") == "truncated at max_tokens"


@pytest.mark.parametrize(
    "bad",
    [
        "The answer is \\boxed{5}.",  # no reasoning block
        "<think>\n3 + 4 = 7\n</think>",  # no answer after it
        "<think>3 + 4 = 7 The answer is \\boxed{5}.",  # never closed
        "<think>a</think><think>b</think> 5",  # two think blocks
        "<think>\n</think>\n\\boxed{5}",  # empty reasoning
    ],
)
def test_required_format_rejects_malformed_responses(bad):
    assert filters.required_format(GOOD) is None
    assert filters.required_format(bad) is not None


def test_required_format_when_the_template_opens_the_think_block():
    assert filters.required_format("3 + 4 = 7\n</think>\n\\boxed{7}", opened_by_prompt=True) is None
    assert filters.required_format("3 + 4 = 7\n</think>\n\\boxed{7}") is not None


def test_language_consistency_rejects_a_mixed_script_answer():
    prompt = "Ada has 3 apples and gets 4 more. How many apples does she have?"
    mixed = "<think>\n3 + 4 = 7, 所以答案是七个苹果\n</think>\nThe answer is \\boxed{7}."
    verdict = filters.language_consistency(prompt, mixed)
    assert verdict is not None and "CJK" in verdict and "LATIN" in verdict
    assert filters.language_consistency(prompt, GOOD) is None
    # Greek letters are mathematics, not a language.
    assert (
        filters.language_consistency(prompt, "<think>the area is π r^2 with θ = 0</think> \\boxed{3}") is None
    )


def test_language_consistency_ignores_latex_in_a_chinese_answer_and_skips_mixed_prompts():
    prompt = "小明有三个苹果，又得到四个。他有几个苹果？"
    answer = "<think>\n三加四等于七\n</think>\n答案是 \\boxed{7}。"
    assert filters.language_consistency(prompt, answer) is None
    assert filters.language_consistency(prompt, "<think>three plus four</think> seven") is not None
    assert filters.language_consistency("Compute 两个 numbers", "anything 任何") is None


def test_repetition_rejects_a_degenerate_loop():
    assert filters.repeated_ngram_fraction([1, 2, 3, 4, 5], 2) == 0.0
    assert filters.repeated_ngram_fraction([7, 7, 7, 7, 7], 2) == pytest.approx(0.75)  # 4 bigrams, 1 distinct
    assert filters.repeated_ngram_fraction([1, 2], 3) == 0.0
    looping = [5, 6, 7, 8] * 30
    assert filters.repetition(looping, n=4, max_fraction=0.5) is not None
    assert filters.repetition(list(range(120)), n=4, max_fraction=0.5) is None


def test_overthinking_caps_absolute_and_relative_think_length():
    assert filters.overthinking(50, max_think_tokens=100, shortest_correct_think=None, max_ratio=None) is None
    assert filters.overthinking(150, max_think_tokens=100, shortest_correct_think=None, max_ratio=None)
    assert filters.overthinking(90, None, shortest_correct_think=20, max_ratio=4.0) is not None
    assert filters.overthinking(80, None, shortest_correct_think=20, max_ratio=4.0) is None


def test_split_think():
    assert filters.split_think(GOOD) == ("\n3 + 4 = 7\n7 - 2 = 5\n", "\nThe answer is \\boxed{5}.")
    assert filters.split_think("no block") == ("", "no block")
