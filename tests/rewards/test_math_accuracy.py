"""math_accuracy on a table of tricky pairs (verdicts decided by hand), extraction rules and anti-hacking."""

import pytest
from math_cases import CASES

from rewards import get, math_accuracy
from rewards.math import answer_region, boxed_contents, final_answers, log10_magnitude, reference_answer

CATEGORIES = {
    "number", "fraction", "mixed number", "percent", "radical", "pi", "complex", "interval", "tuple/set",
    "matrix", "equation", "units", "choice", "symbolic", "extraction", "hacking", "pathological",
}  # fmt: skip


def test_the_table_covers_every_category_with_both_verdicts():
    assert len(CASES) >= 80
    assert {case.category for case in CASES} == CATEGORIES
    assert sum(case.expected for case in CASES) >= 30 and sum(not case.expected for case in CASES) >= 30


@pytest.fixture(scope="module")
def table_scores():
    """The whole table in one call, through the bounded pool, as a trainer would score it."""
    return math_accuracy([""] * len(CASES), [c.completion for c in CASES], [c.reference for c in CASES])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c.category}-{i}" for i, c in enumerate(CASES)])
def test_table(table_scores, index):
    case = CASES[index]
    assert table_scores[index] == float(case.expected), case


def test_registered_and_chat_shaped_completions():
    assert get("math_accuracy") is math_accuracy
    chat = [
        [{"role": "assistant", "content": "so \\boxed{12}"}],
        [{"role": "assistant", "content": "\\boxed{13}"}],
    ]
    assert math_accuracy([[{"role": "user", "content": "q"}]] * 2, chat, ["12", "12"]) == [1.0, 0.0]


def test_missing_reference_means_not_applicable():
    assert math_accuracy(["", ""], ["\\boxed{1}", "\\boxed{1}"], [None, "1"]) == [None, 1.0]
    with pytest.raises(ValueError, match="column 'answer' has 1 rows for 2 completions"):
        math_accuracy(["", ""], ["a", "b"], ["1"])


def test_extraction_modes_are_configurable():
    text = "<answer>5</answer> and later \\boxed{6}"
    assert math_accuracy([""], [text], ["6"]) == [1.0]  # boxed comes first by default
    assert math_accuracy([""], [text], ["5"], modes=["answer_tag"]) == [1.0]
    assert math_accuracy([""], [text], ["6"], modes=["hash"]) == [0.0]
    with pytest.raises(ValueError, match="unknown extraction mode"):
        final_answers(text, ["last_number"])


def test_extraction_helpers():
    assert boxed_contents("\\boxed{\\frac{1}{2}} then \\fbox{x^{2}} and \\boxed{unclosed") == [
        "\\frac{1}{2}",
        "x^{2}",
    ]
    assert boxed_contents("\\boxed{\\boxed{3}}") == ["3"]
    assert answer_region("<think>\\boxed{1}</think>\\boxed{2}") == "\\boxed{2}"
    assert answer_region("<think>still thinking") is None
    assert final_answers("\\boxed{ 1/2 } and \\boxed{1/2}.") == ["1/2"]  # equal spellings count once
    assert final_answers("<answer>So it is \\boxed{5}.</answer>", ["answer_tag"]) == ["5"]
    assert final_answers("<answer>\\boxed{5} or \\boxed{6}</answer>", ["answer_tag"]) == ["5", "6"]
    assert reference_answer("Half of 48 is 24.\n#### 24") == "24"
    assert reference_answer("The sum is $\\boxed{10}$.") == "10"


def test_magnitude_estimate_never_builds_the_number():
    from sympy import Integer, Pow, factorial

    tower = Pow(10, Pow(10, Pow(10, 10, evaluate=False), evaluate=False), evaluate=False)
    assert log10_magnitude(tower) == float("inf")
    for base, exponent in [(2, 100), (7, 1000), (123456789, 55)]:  # an upper estimate, within a small factor
        digits = len(str(base**exponent))
        assert digits <= log10_magnitude(Pow(base, exponent, evaluate=False)) <= 4 * digits
    assert 456_573 <= log10_magnitude(factorial(Integer(10**5), evaluate=False)) <= 4 * 456_574
