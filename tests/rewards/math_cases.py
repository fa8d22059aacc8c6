r"""Tricky (completion, reference, expected verdict) triples for math answer checking.

Shared by tests/rewards/test_math_accuracy.py and bench/rewards.py. Each verdict was decided by hand from the
mathematics, not by running a checker. Completions use the extraction rules of ``rewards.math``: the final
answer is in ``\boxed{}``, ``<answer>`` tags or after ``####``, after the last ``</think>``.
"""

from typing import NamedTuple


class Case(NamedTuple):
    category: str
    completion: str
    reference: str
    expected: bool


def boxed(answer: str) -> str:
    return f"Working it out step by step, the result is $\\boxed{{{answer}}}$."


CASES = [
    # numbers
    Case("number", boxed("42"), "42", True),
    Case("number", boxed("42.0"), "42", True),
    Case("number", boxed("-7"), "-7", True),
    Case("number", boxed("7"), "-7", False),
    Case("number", boxed("1,000"), "1000", True),
    Case("number", boxed("1{,}000"), "1000", True),
    Case("number", boxed("1000000"), "10^6", True),
    Case("number", boxed("0.1"), "0.10", True),
    Case("number", boxed("41.9"), "42", False),
    Case("number", boxed("\\$5"), "5", True),
    # fractions
    Case("fraction", boxed("\\frac{1}{2}"), "0.5", True),
    Case("fraction", boxed("\\dfrac{3}{4}"), "\\frac{3}{4}", True),
    Case("fraction", boxed("6/8"), "\\frac{3}{4}", True),
    Case("fraction", boxed("\\frac{2}{3}"), "\\frac{3}{2}", False),
    Case("fraction", boxed("0.333"), "\\frac{1}{3}", False),
    Case("fraction", boxed("\\frac{-1}{2}"), "-\\frac{1}{2}", True),
    Case("fraction", boxed("\\frac12"), "\\frac{1}{2}", True),
    # mixed numbers
    Case("mixed number", boxed("1\\frac{1}{2}"), "\\frac{3}{2}", True),
    Case("mixed number", boxed("2\\frac{3}{4}"), "2.75", True),
    Case("mixed number", boxed("2\\frac{3}{4}"), "\\frac{3}{2}", False),
    # percentages
    Case("percent", boxed("50\\%"), "50", True),
    Case("percent", boxed("50\\%"), "\\frac{1}{2}", True),
    Case("percent", boxed("25\\%"), "50", False),
    Case("percent", boxed("12.5\\%"), "12.5", True),
    # radicals
    Case("radical", boxed("\\sqrt{8}"), "2\\sqrt{2}", True),
    Case("radical", boxed("\\frac{\\sqrt{3}}{2}"), "\\frac{1}{2}\\sqrt{3}", True),
    Case("radical", boxed("\\sqrt{3}"), "3", False),
    Case("radical", boxed("\\frac{1}{\\sqrt{2}}"), "\\frac{\\sqrt{2}}{2}", True),
    Case("radical", boxed("\\sqrt[3]{27}"), "3", True),
    Case("radical", boxed("2\\sqrt{3}"), "\\sqrt{13}", False),
    # pi
    Case("pi", boxed("2\\pi"), "2\\pi", True),
    Case("pi", boxed("\\pi \\cdot 2"), "2\\pi", True),
    Case("pi", boxed("3.14"), "\\pi", False),
    Case("pi", boxed("\\frac{\\pi}{2}"), "\\frac{1}{2}\\pi", True),
    Case("pi", boxed("\\pi"), "2\\pi", False),
    # complex numbers
    Case("complex", boxed("2+3i"), "3i+2", True),
    Case("complex", boxed("2-3i"), "2+3i", False),
    Case("complex", boxed("i^2"), "-1", True),
    Case("complex", boxed("\\frac{1+i}{2}"), "\\frac{1}{2}+\\frac{1}{2}i", True),
    # intervals
    Case("interval", boxed("[1,2)"), "[1,2)", True),
    Case("interval", boxed("(1,2]"), "[1,2)", False),
    Case("interval", boxed("(-\\infty, 3)"), "(-\\infty,3)", True),
    Case("interval", boxed("(-\\infty, 3]"), "(-\\infty,3)", False),
    Case("interval", boxed("[0,1]\\cup[2,3]"), "[0,1]\\cup[2,3]", True),
    # tuples and sets
    Case("tuple/set", boxed("(1,2)"), "(1,2)", True),
    Case("tuple/set", boxed("(2,1)"), "(1,2)", False),
    Case("tuple/set", boxed("\\{2,1\\}"), "\\{1,2\\}", True),
    Case("tuple/set", boxed("\\{1,2,3\\}"), "\\{1,2\\}", False),
    Case("tuple/set", boxed("1, 2"), "\\{1,2\\}", True),
    Case("tuple/set", boxed("(3, -1, 2)"), "(3,-1,2)", True),
    Case("tuple/set", boxed("(3, 1, 2)"), "(3,-1,2)", False),
    # matrices and vectors
    Case(
        "matrix", boxed("\\begin{pmatrix}1\\\\2\\end{pmatrix}"), "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True
    ),
    Case(
        "matrix",
        boxed("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        True,
    ),
    Case(
        "matrix",
        boxed("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}"),
        "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
        False,
    ),
    Case(
        "matrix",
        boxed("\\begin{bmatrix}0.5\\\\1\\end{bmatrix}"),
        "\\begin{pmatrix}\\frac{1}{2}\\\\1\\end{pmatrix}",
        True,
    ),
    # equations
    Case("equation", boxed("x=3"), "3", True),
    Case("equation", boxed("x = 3"), "x=3", True),
    Case("equation", boxed("x=4"), "3", False),
    Case("equation", boxed("y=2x+1"), "y=1+2x", True),
    Case("equation", boxed("y=2x+2"), "y=2x+1", False),
    Case("equation", boxed("2x+1"), "y=2x+1", True),
    Case("equation", boxed("1 + 2 = 3"), "3", True),  # the working, then the answer: a true statement
    # units and degrees
    Case("units", boxed("30^\\circ"), "30", True),
    Case("units", boxed("30^{\\circ}"), "30^\\circ", True),
    Case("units", boxed("60^\\circ"), "30", False),
    Case("units", boxed("5 \\text{ cm}"), "5", True),
    Case("units", boxed("12\\text{ meters}"), "12", True),
    Case("units", boxed("13 \\text{ cm}"), "12", False),
    # multiple choice
    Case("choice", boxed("C"), "C", True),
    Case("choice", boxed("(C)"), "C", True),
    Case("choice", boxed("\\text{(C)}"), "C", True),
    Case("choice", boxed("C) 12"), "C", True),
    Case("choice", boxed("B"), "C", False),
    Case("choice", boxed("A or C"), "C", False),
    Case("choice", boxed("12"), "C", False),
    # symbolic expressions
    Case("symbolic", boxed("x^2+2x+1"), "(x+1)^2", True),
    Case("symbolic", boxed("x^2+1"), "(x+1)^2", False),
    Case("symbolic", boxed("\\sin^2 x + \\cos^2 x"), "1", True),
    Case("symbolic", boxed("\\frac{x^2-1}{x-1}"), "x+1", True),
    Case("symbolic", boxed("2\\log 2"), "\\log 4", True),
    Case("symbolic", boxed("e^{i\\pi}"), "-1", True),
    Case("symbolic", boxed("\\binom{5}{2}"), "10", True),
    Case("symbolic", boxed("a+b"), "a-b", False),
    # extraction: where the answer is and where it is not
    Case("extraction", "#### 72", "72", True),
    Case(
        "extraction",
        "She pays 3 * 24 = 72 dollars.\n#### 72",
        "Natalia sold 48/2 = 24 clips...\n#### 72",
        True,
    ),
    Case("extraction", "#### 1,234", "1234", True),
    Case("extraction", "<answer>72</answer>", "72", True),
    Case("extraction", "<answer>\\frac{1}{2}</answer>", "0.5", True),
    Case("extraction", "<think>It could be \\boxed{5}.</think> The answer is $\\boxed{7}$.", "7", True),
    Case("extraction", "<think>It is probably 7, so the answer is \\boxed{7", "7", False),
    Case("extraction", "The answer is 7.", "7", False),
    Case("extraction", boxed("7"), "The area is $\\boxed{7}$ square units.", True),
    Case("extraction", "So \\boxed{\\boxed{9}}.", "9", True),
    Case("extraction", "First \\boxed{3}. Checking again, the answer is \\boxed{3}.", "3", True),
    Case("extraction", "It is \\boxed{\\frac12}, i.e. \\boxed{0.5}.", "\\frac{1}{2}", True),
    # anti-hacking: hedges and empty answers are wrong
    Case("hacking", "Either \\boxed{2} or \\boxed{3}.", "3", False),
    Case("hacking", "\\boxed{3} \\boxed{4} \\boxed{5} \\boxed{6}", "5", False),
    Case("hacking", "<answer>2</answer> <answer>3</answer>", "3", False),
    Case("hacking", boxed(""), "0", False),
    Case("hacking", boxed("\\text{}"), "0", False),
    Case("hacking", "", "0", False),
    Case("hacking", boxed("2, 3"), "2", False),
    Case("hacking", boxed("\\pm 2"), "2", False),
    Case("hacking", boxed("x"), "5", False),
    # a false equation whose right side is the answer (math-verify alone compares the right side only)
    Case("hacking", boxed("2 - 1 = 3"), "3", False),
    Case("hacking", boxed("5 = 3"), "3", False),
    Case("hacking", boxed("x = 5 = 3"), "3", False),
    # pathological: must be decided, quickly
    Case("pathological", boxed("10^{10^{10^{10}}}"), "1", False),
    Case("pathological", boxed("10^{10^{10^{10}}}"), "10^{10^{10^{10}}}", True),
    Case("pathological", boxed("\\dfrac{10^{10^{10^{10}}}}{2}"), "5", False),
    Case("pathological", boxed("9^{9^{9}}"), "9", False),
    Case("pathological", boxed("(10^{10})!"), "1", False),
    Case("pathological", boxed("\\prod_{n=1}^{10^{7}} n"), "2", False),  # not screened: the deadline ends it
    Case("pathological", boxed("2^{100}"), "1267650600228229401496703205376", True),
]
