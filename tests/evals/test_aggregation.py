import pytest

from posttrain.evals.scoring import (
    PairResult,
    classifier_pair_score,
    judge_pair_score,
    overall_score,
    section_scores,
    subset_accuracies,
    summarize,
)


def _results(table: dict[str, list[float]]) -> list[PairResult]:
    return [
        PairResult(id=f"{subset}-{i}", subset=subset, score=score)
        for subset, scores in table.items()
        for i, score in enumerate(scores)
    ]


# Pair scores per subset; a 0.5 is a judge tie. "my-own-subset" belongs to no RewardBench section.
TABLE = {
    "alpacaeval-easy": [1, 1, 0],  # 2/3
    "mt-bench-easy": [1, 0.5],  # 3/4
    "llmbar-natural": [0, 1],  # 1/2
    "refusals-dangerous": [1, 1],  # 1
    "xstest-should-respond": [0, 1, 1, 1],  # 3/4
    "math-prm": [1, 0],  # 1/2
    "hep-python": [1, 1],  # 1
    "my-own-subset": [0, 0, 0],  # 0
}
# Section scores by hand, weights from RewardBench's EXAMPLE_COUNTS (not from the pair counts above):
#   Chat      = (100 * 2/3 + 28 * 3/4) / (100 + 28)  = (200/3 + 21) / 128 = 263/384
#   Chat Hard = 1/2                                   (one subset)
#   Safety    = (100 * 1 + 250 * 3/4) / (100 + 250)  = 287.5 / 350        = 23/28
#   Reasoning = (984 * 1/2 + 164 * 1) / (984 + 164)  = 656 / 1148         = 4/7
#   Overall   = (263/384 + 1/2 + 23/28 + 4/7) / 4 = (1841 + 1344 + 2208 + 1536) / 2688 / 4 = 6929/10752
HAND_SECTIONS = {"Chat": 0.68489583333, "Chat Hard": 0.5, "Safety": 0.82142857143, "Reasoning": 0.57142857143}
HAND_OVERALL = 0.64443824405


def test_sections_and_overall_match_hand_computation():
    accuracies = subset_accuracies(_results(TABLE))
    assert accuracies["alpacaeval-easy"] == pytest.approx(2 / 3)
    assert accuracies["mt-bench-easy"] == pytest.approx(0.75)
    sections = section_scores(accuracies)
    assert sections == pytest.approx(HAND_SECTIONS, abs=1e-10)
    assert overall_score(sections) == pytest.approx(HAND_OVERALL, abs=1e-10)


def test_summary_reports_counts_unknown_subsets_and_missing_sections():
    summary = summarize(_results(TABLE))
    assert summary["overall"] == pytest.approx(HAND_OVERALL, abs=1e-10)
    assert summary["subsets"]["xstest-should-respond"] == {"accuracy": 0.75, "pairs": 4, "weight": 250}
    assert summary["unknown_subsets"] == ["my-own-subset"]
    assert summary["missing_sections"] == []
    assert summary["pairs"] == sum(len(v) for v in TABLE.values())

    without_safety = {
        k: v for k, v in TABLE.items() if k not in ("refusals-dangerous", "xstest-should-respond")
    }
    partial = summarize(_results(without_safety))
    assert partial["missing_sections"] == ["Safety"]
    assert "Safety" not in partial["sections"]
    # The mean of the three evaluated sections, never a Safety of 0 pulled into the average.
    expected = (HAND_SECTIONS["Chat"] + HAND_SECTIONS["Chat Hard"] + HAND_SECTIONS["Reasoning"]) / 3
    assert partial["overall"] == pytest.approx(expected, abs=1e-10)


def test_no_known_subset_is_an_error():
    with pytest.raises(ValueError, match="no RewardBench section"):
        overall_score(section_scores(subset_accuracies(_results({"my-own-subset": [1]}))))
    assert summarize(_results({"my-own-subset": [1]}))["overall"] is None


def test_classifier_tie_counts_as_wrong():
    assert classifier_pair_score(1.5, 1.0) == 1.0
    assert classifier_pair_score(1.0, 1.5) == 0.0
    assert classifier_pair_score(1.0, 1.0) == 0.0


@pytest.mark.parametrize(
    ("verdicts", "chosen_position", "score"),
    [
        (["A"], "A", 1.0),
        (["B"], "A", 0.0),
        (["A"], "B", 0.0),
        (["tie"], "A", 0.5),
        (["unparseable"], "B", 0.5),
        (["A", "B"], "A", 0.5),  # both orders disagree: a split vote is a tie
        (["A", "A", "B"], "A", 1.0),
        (["A", "B", "B"], "B", 1.0),
        (["B", "unparseable", "tie"], "A", 0.5),  # most verdicts name no winner
        (["B", "B", "unparseable"], "A", 0.0),
        (["A", "tie"], "A", 0.5),
    ],
)
def test_judge_majority_vote(verdicts, chosen_position, score):
    assert judge_pair_score(verdicts, chosen_position) == score


def test_judge_pair_score_rejects_bad_arguments():
    with pytest.raises(ValueError, match="chosen_position"):
        judge_pair_score(["A"], "C")
    with pytest.raises(ValueError, match="at least one verdict"):
        judge_pair_score([], "A")
