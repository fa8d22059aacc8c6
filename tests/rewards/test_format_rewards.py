"""Format and shaping rewards against values computed by hand from their formulas."""

import math

import pytest

from rewards import (
    RewardRunner,
    RewardSpec,
    cosine_length,
    dapo_overlong,
    length_penalty,
    r1_format,
    repetition_penalty,
    tag_count,
)
from rewards.format import cosine_schedule


def ids(*lengths):
    return [[0] * n for n in lengths]


def test_r1_format():
    completions = [
        "<think>reason</think>answer",
        "  <think>\nreason\n</think>\n\nThe answer is 4.",
        "<think>reason</think>",  # no answer
        "<think>  </think> answer",  # empty reasoning
        "<think>a</think> b <think>c</think> d",  # a second think block
        "preamble <think>reason</think> answer",  # text before <think>
        "reason</think> answer",  # not opened
        "<think>reason answer",  # never closed
    ]
    assert r1_format([""] * 8, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert r1_format([""], ["reason</think> answer"], opened_by_prompt=True) == [1.0]
    tagged = [
        "<think>r</think>\n<answer>42</answer>\n",
        "<think>r</think> 42",
        "<think>r</think><answer>42</answer> and more",
        "<think>r</think><answer> </answer>",
        "<think>r</think><answer>4<answer>2</answer>",
    ]
    assert r1_format([""] * 5, tagged, require_answer_tags=True) == [1.0, 0.0, 0.0, 0.0, 0.0]
    chat = [[{"role": "assistant", "content": "<think>r</think>a"}]]
    assert r1_format([[{"role": "user", "content": "q"}]], chat) == [1.0]


def test_tag_count():
    completions = [
        "<think>\nx\n</think>\n<answer>\n1\n</answer>",  # all four once: 4/4
        "<think>x</think>",  # two of four: 2/4
        "<think><think>x</think><answer>1</answer>",  # <think> twice: 3/4
        "nothing",
    ]
    assert tag_count([""] * 4, completions) == [1.0, 0.5, 0.75, 0.0]
    assert tag_count([""], ["<a></a>"], tags=("<a>", "</a>", "<b>")) == [pytest.approx(2 / 3)]


def test_repetition_penalty():
    # words a b c a b c: trigrams abc, bca, cab, abc -> 3 distinct of 4 -> -1 * (1 - 3/4)
    assert repetition_penalty([""] * 3, ["a b c a b c", "A b C a B c", "a b"]) == [-0.25, -0.25, 0.0]
    assert repetition_penalty([""], ["a b c a b c"], max_penalty=-0.5) == [-0.125]
    # bigrams of "x x x x": 3 bigrams, 1 distinct -> -(1 - 1/3)
    assert repetition_penalty([""], ["x x x x"], ngram=2) == [pytest.approx(-2 / 3)]
    assert repetition_penalty([""], ["all words differ here"], ngram=2) == [0.0]
    with pytest.raises(ValueError, match="max_penalty must be <= 0"):
        repetition_penalty([""], ["a"], max_penalty=1.0)


def test_cosine_schedule_and_cosine_length():
    assert cosine_schedule(0, 100, 1.0, 0.5) == 1.0
    assert cosine_schedule(100, 100, 1.0, 0.5) == 0.5
    assert cosine_schedule(150, 100, 1.0, 0.5) == 0.5
    assert cosine_schedule(50, 100, 1.0, 0.5) == pytest.approx(0.75)
    assert cosine_schedule(25, 100, 1.0, 0.5) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 4)))
    completions = ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}", "\\boxed{5}", "\\boxed{4}"]
    scores = cosine_length(
        [""] * 5,
        completions,
        ["4", "4", "4", "4", None],
        completion_ids=ids(0, 50, 0, 50, 10),
        max_length=100,
    )
    # correct: 1.0 at L=0, 0.75 at L=L_max/2; wrong: -1.0 at L=0, -0.5 + 0.5*(-0.5)*(1+0) = -0.75 at L_max/2
    assert scores == [1.0, pytest.approx(0.75), -1.0, pytest.approx(-0.75), None]
    with pytest.raises(ValueError, match="needs the 'completion_ids' column"):
        cosine_length([""], ["\\boxed{4}"], ["4"])


def test_dapo_overlong():
    # L_max = 100, L_cache = 20: free up to 80, then (80 - L) / 20, then -1 past 100
    scores = dapo_overlong(
        [""] * 6, ["x"] * 6, completion_ids=ids(10, 80, 81, 90, 100, 101), max_length=100, cache_length=20
    )
    assert scores == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_length <= max_length"):
        dapo_overlong([""], ["x"], completion_ids=ids(1), max_length=10, cache_length=20)


def test_length_penalty_is_relative_to_the_prompt_group():
    prompts = ["p1", "p1", "p1", "p1", "p2", "p3"]
    completions = ["\\boxed{1}", "\\boxed{1}", "\\boxed{2}", "\\boxed{2}", "\\boxed{1}", "\\boxed{1}"]
    answers = ["1", "1", "1", "1", "1", None]
    # p1 lengths 10, 20, 30, 10: lambda = 0.5, 0, -0.5, 0.5; correct keep lambda, wrong get min(0, lambda)
    scores = length_penalty(prompts, completions, answers, completion_ids=ids(10, 20, 30, 10, 99, 5))
    assert scores == [0.5, 0.0, -0.5, 0.0, 0.0, None]


def test_batched_length_penalty_through_the_runner():
    specs = [RewardSpec("length_penalty"), RewardSpec("math_accuracy", weight=1.0)]
    columns = {"answer": ["1", "1"], "completion_ids": ids(10, 30)}
    with RewardRunner(specs, workers=1) as runner:
        scores = runner.score(["p", "p"], ["\\boxed{1}", "\\boxed{1}"], columns)
    assert scores.per_function["length_penalty"] == [0.5, -0.5]
    assert scores.total == [1.5, 0.5]
