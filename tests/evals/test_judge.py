from collections import Counter

import pytest

from posttrain.evals.pairs import load_pairs
from posttrain.evals.rewardbench import score_with_judge
from posttrain.evals.scoring import subset_accuracies


class RecordingJudge:
    """Answers through `pick(prompt, a, b) -> verdict list` and records what it was shown."""

    def __init__(self, pick):
        self.pick = pick
        self.shown = []

    def verdicts(self, prompts, responses_a, responses_b):
        self.shown = list(zip(prompts, responses_a, responses_b, strict=True))
        return [self.pick(*shown) for shown in self.shown]


@pytest.fixture(scope="module")
def pairs(bundled_pairs):
    return load_pairs(bundled_pairs)


def test_chosen_position_is_a_seeded_coin_and_is_what_the_judge_saw(pairs):
    chosen = {p.id: p.chosen for p in pairs}
    judge = RecordingJudge(lambda prompt, a, b: ["A"])
    results = score_with_judge(pairs, judge, seed=0)
    for (_, a, b), pair, result in zip(judge.shown, pairs, results, strict=True):
        assert {a, b} == {pair.chosen, pair.rejected}
        assert (a if result.chosen_position == "A" else b) == chosen[pair.id]
    positions = [r.chosen_position for r in results]
    assert positions == [r.chosen_position for r in score_with_judge(pairs, judge, seed=0)]
    assert positions != [r.chosen_position for r in score_with_judge(pairs, judge, seed=1)]
    assert 0.35 < Counter(positions)["A"] / len(positions) < 0.65
    # A judge that always answers "A" is right exactly where the coin put the chosen response first.
    assert [r.score for r in results] == [float(p == "A") for p in positions]


def test_oracle_and_contrarian_judges(pairs):
    chosen = {(p.prompt, p.chosen) for p in pairs}
    oracle = RecordingJudge(lambda prompt, a, b: ["A" if (prompt, a) in chosen else "B"])
    contrarian = RecordingJudge(lambda prompt, a, b: ["B" if (prompt, a) in chosen else "A"])
    assert set(subset_accuracies(score_with_judge(pairs, oracle, seed=0)).values()) == {1.0}
    assert set(subset_accuracies(score_with_judge(pairs, contrarian, seed=0)).values()) == {0.0}


def test_unparseable_and_split_votes_count_half(pairs):
    chosen = {(p.prompt, p.chosen) for p in pairs}
    results = score_with_judge(pairs, RecordingJudge(lambda prompt, a, b: ["unparseable"]), seed=0)
    assert {r.score for r in results} == {0.5}
    # One right verdict and one wrong one: the votes split, a tie.
    split = RecordingJudge(
        lambda prompt, a, b: ["A" if (prompt, a) in chosen else "B", "A" if (prompt, b) in chosen else "B"]
    )
    assert {r.score for r in score_with_judge(pairs, split, seed=0)} == {0.5}


def test_judge_must_answer_every_pair(pairs):
    class ShortJudge:
        def verdicts(self, prompts, responses_a, responses_b):
            return [["A"]] * (len(prompts) - 1)

    with pytest.raises(RuntimeError, match="returned 1 verdict lists for 2 pairs"):
        score_with_judge(pairs[:2], ShortJudge(), seed=0)


# ---- the real rewards.judge.PairwiseJudge, driven by scripted generators

TEMPLATE = "Question: {prompt}\n<<A>>{response_a}<</A>>\n<<B>>{response_b}<</B>>\nAnswer [[A]] or [[B]]."


def _shown(messages):
    content = messages[-1]["content"]
    prompt = content.split("\n<<A>>")[0].removeprefix("Question: ")
    a = content.split("<<A>>")[1].split("<</A>>")[0]
    b = content.split("<<B>>")[1].split("<</B>>")[0]
    return prompt, a, b


def oracle_generator(pairs):
    """Knows each pair's chosen response and writes the verdict the way a judge model would."""
    chosen = {(p.prompt, p.chosen) for p in pairs}

    def generate(batch):
        texts = []
        for messages in batch:
            prompt, a, _ = _shown(messages)
            better = "A" if (prompt, a) in chosen else "B"
            texts.append(f"Assistant {better} follows the request. [[{better}]]")
        return texts

    return generate


def test_real_judge_with_oracle_generator_is_always_right(pairs):
    from rewards.judge import PairwiseJudge

    judge = PairwiseJudge(oracle_generator(pairs), template=TEMPLATE, votes=1, both_orders=True)
    results = score_with_judge(pairs, judge, seed=0)
    assert {r.score for r in results} == {1.0}
    assert all(r.verdicts == [r.chosen_position] * 2 for r in results)


def test_real_judge_position_bias_cancels_with_both_orders(pairs):
    from rewards.judge import PairwiseJudge

    always_first = lambda batch: ["[[A]]"] * len(batch)  # noqa: E731
    both = score_with_judge(pairs, PairwiseJudge(always_first, template=TEMPLATE, both_orders=True), seed=0)
    assert {r.score for r in both} == {0.5}  # says A, then (swapped) B: a split vote
    one = score_with_judge(pairs, PairwiseJudge(always_first, template=TEMPLATE, both_orders=False), seed=0)
    assert [r.score for r in one] == [float(r.chosen_position == "A") for r in one]


def test_real_judge_votes_take_the_majority(pairs):
    from rewards.judge import PairwiseJudge

    right = oracle_generator(pairs)

    def noisy(batch):
        # Of each pair's 3 votes per order the last is garbled: the majority stays right.
        texts = right(batch)
        return [text if i % 3 != 2 else "I cannot decide." for i, text in enumerate(texts)]

    judge = PairwiseJudge(noisy, template=TEMPLATE, votes=3, both_orders=True)
    results = score_with_judge(pairs, judge, seed=0)
    assert {r.score for r in results} == {1.0}
    assert all(r.verdicts.count("unparseable") == 2 and len(r.verdicts) == 6 for r in results)


def test_verdict_summary_shows_position_bias_and_unreadable_verdicts(pairs):
    """A judge that always takes the first answer shown ties every pair when asked in both orders; the summary
    says so (first_shown_rate 1.0), where an oracle picks the first answer exactly half the time."""
    from posttrain.evals.rewardbench import verdict_summary

    chosen = {(p.prompt, p.chosen) for p in pairs}
    first = score_with_judge(pairs, RecordingJudge(lambda prompt, a, b: ["A", "B"]), seed=0)
    assert {r.score for r in first} == {0.5}
    assert verdict_summary(first, votes=1) == {
        "verdict_counts": {"A": len(pairs), "B": len(pairs)},
        "unparseable_rate": 0.0,
        "first_shown_rate": 1.0,
    }
    oracle = RecordingJudge(lambda prompt, a, b: ["A" if (prompt, a) in chosen else "B"] * 2)
    assert verdict_summary(score_with_judge(pairs, oracle, seed=0), votes=1)["first_shown_rate"] == 0.5
    half = RecordingJudge(lambda prompt, a, b: ["A", "unparseable", "A", "unparseable"])  # 2 votes per order
    summary = verdict_summary(score_with_judge(pairs, half, seed=0), votes=2)
    assert summary["unparseable_rate"] == 0.5 and summary["first_shown_rate"] == 0.5
    unreadable = score_with_judge(pairs, RecordingJudge(lambda prompt, a, b: ["unparseable"]), seed=0)
    assert verdict_summary(unreadable, votes=1)["first_shown_rate"] is None
