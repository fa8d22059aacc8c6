"""Math answer checking: extract the final answer, compare it with the reference, within a hard time bound.

Equivalence is decided by math-verify (LaTeX and plain answers parsed into sympy by latex2sympy2_extended:
numbers, fractions, percentages, radicals, pi, complex numbers, intervals, sets and tuples, matrices,
equations, units, degrees, symbolic expressions). What this module adds:

* extraction that a policy cannot game: only the text after the last ``</think>`` counts; an unfinished
  ``<think>`` has no answer; every distinct final answer must equal the reference (hedging with
  ``\\boxed{2}`` ... ``\\boxed{3}`` is wrong); an empty answer is wrong;
* multiple-choice letters (``C``, ``(C)``, ``C) 12``) against a letter reference;
* answers whose exact value would have more than ``MAX_DIGITS`` digits (power towers such as
  ``10^{10^{10^{10}}}``) are compared by form, never evaluated: sympy would try to build the number;
* a hard time bound on every check, in any thread: the check runs in a pool worker that is killed at the
  deadline (math-verify's own timeout uses ``signal.alarm``, which only works in the main thread and cannot
  interrupt C code).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache

import sympy
from math_verify import parse, verify
from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

from rewards.pool import Call, run_bounded
from rewards.registry import message_text, register

logger = logging.getLogger(__name__)
EXTRACTION_MODES = ("boxed", "answer_tag", "hash")
MAX_DIGITS = 10_000


class _DropTimeoutDisabledWarning(logging.Filter):
    """We disable math-verify's signal timeouts on purpose (the pool bounds time); keep the logs quiet."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# ---------------------------------------------------------------- extraction


def answer_region(text: str) -> str | None:
    """The part of a completion that may hold the answer: after the last ``</think>``; ``None`` if a
    ``<think>`` block was opened and never closed (the completion was cut off while reasoning)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def boxed_contents(text: str) -> list[str]:
    """Contents of the top-level ``\\boxed{...}`` / ``\\fbox{...}`` in order; unbalanced (cut-off) ones are
    skipped, and a box inside a box is its outer box."""
    contents = []
    position = 0
    opener = re.compile(r"\\(?:boxed|fbox)\s*\{")
    while match := opener.search(text, position):
        depth, end = 1, match.end()
        while end < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            end += 1
        if depth:
            break
        contents.append(_unbox(text[match.end() : end - 1]))
        position = end
    return contents


def _unbox(content: str) -> str:
    inner = boxed_contents(content)
    return inner[0] if len(inner) == 1 and normalize(content).startswith(("\\boxed", "\\fbox")) else content


def _answer_tag_contents(text: str) -> list[str]:
    return re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)


def _hash_contents(text: str) -> list[str]:
    """GSM8K style ``#### 1,234``: the last one, to the end of its line."""
    found = re.findall(r"####\s*([^\n]*)", text)
    return found[-1:]


_EXTRACTORS = {"boxed": boxed_contents, "answer_tag": _answer_tag_contents, "hash": _hash_contents}


def final_answers(text: str, modes: Sequence[str] = EXTRACTION_MODES) -> list[str]:
    """The distinct final answers of a completion, from the first mode in ``modes`` that finds any.

    Modes: ``boxed`` (``\\boxed{}``), ``answer_tag`` (``<answer>...</answer>``), ``hash`` (``#### 42``); a
    tag or ``####`` answer that holds boxes stands for their contents. An empty list means no answer. Answers
    equal after ``normalize`` count once.
    """
    unknown = [mode for mode in modes if mode not in _EXTRACTORS]
    if unknown:
        raise ValueError(f"unknown extraction mode(s) {unknown}; choose from {list(_EXTRACTORS)}")
    region = answer_region(text)
    if region is None:
        return []
    for mode in modes:
        found = [
            boxed for content in _EXTRACTORS[mode](region) for boxed in boxed_contents(content) or [content]
        ]
        if found:
            distinct: dict[str, str] = {}
            for answer in found:
                distinct.setdefault(normalize(answer), answer.strip())
            return list(distinct.values())
    return []


def reference_answer(reference: str) -> str:
    """The answer inside a reference: after ``####`` (GSM8K solutions), inside ``\\boxed{}`` (MATH
    solutions), else the whole string."""
    if "####" in reference:
        return _hash_contents(reference)[0].strip()
    boxed = boxed_contents(reference)
    return boxed[-1] if boxed else reference.strip()


# ---------------------------------------------------------------- equivalence

_SPACING = re.compile(r"\\(?:left|right|displaystyle|[!,;: ])|\s|\$")


def normalize(answer: str) -> str:
    """Spelling-only normalisation (spacing, ``$``, ``\\left``, ``\\dfrac``, a trailing period): two answers
    equal after it are equal without parsing."""
    answer = _SPACING.sub("", answer)
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return answer.rstrip(".")


_LETTER_REFERENCE = re.compile(r"^\(?([A-J])\)?$")
# A letter alone, or a letter with its option text: "C", "(C)", "C.", "C) 12", "(C) 12".
_LETTER_ANSWER = re.compile(r"^\(?([A-J])(?:\)?[.:]?$|\)|[.:]\S)")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


def _choice_letter(answer: str, pattern: re.Pattern) -> str | None:
    match = pattern.match(_TEXT_WRAPPER.sub(r"\1", normalize(answer)))
    return match.group(1) if match else None


def _parse(answer: str) -> list:
    """math-verify's parse of one answer (LaTeX or plain); its signal timeout is off because we bound time."""
    return parse(
        "\\boxed{" + answer + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=None,
    )


_parse_reference = lru_cache(maxsize=4096)(_parse)  # a GRPO group shares one reference


def log10_magnitude(expr: sympy.Basic) -> float:
    """An upper estimate of log10|expr| for numbers built from integers, powers, products, sums and
    factorials, computed without building the number (0 for anything else, e.g. symbols)."""
    if isinstance(expr, sympy.Integer):
        return abs(int(expr)).bit_length() * math.log10(2)
    if isinstance(expr, sympy.Rational):
        return max(log10_magnitude(sympy.Integer(expr.p)), log10_magnitude(sympy.Integer(expr.q)))
    if isinstance(expr, sympy.Pow):
        exponent_digits = log10_magnitude(expr.exp)
        if exponent_digits > 300:
            return math.inf
        return 10**exponent_digits * log10_magnitude(expr.base)
    if isinstance(expr, sympy.factorial):
        n_digits = log10_magnitude(expr.args[0])
        return math.inf if n_digits > 300 else 10**n_digits * n_digits
    if isinstance(expr, sympy.Mul | sympy.Add):
        return sum(log10_magnitude(arg) for arg in expr.args)
    return 0.0


def _explosive(parsed: list) -> bool:
    return any(isinstance(item, sympy.Basic) and log10_magnitude(item) > MAX_DIGITS for item in parsed)


@lru_cache(maxsize=8192)  # the completions of a GRPO group mostly end in a few distinct answers
def answers_match(answer: str, reference: str) -> bool:
    """Whether one extracted answer equals the reference answer (both strings, LaTeX or plain)."""
    if not answer.strip():
        return False
    if normalize(answer) == normalize(reference):
        return True
    letter = _choice_letter(reference, _LETTER_REFERENCE)
    if letter is not None:
        return _choice_letter(answer, _LETTER_ANSWER) == letter
    answer_value, reference_value = plain_number(answer), plain_number(reference)
    if answer_value is not None and reference_value is not None:
        if answer_value == reference_value:
            return True
        if answer_value.denominator == reference_value.denominator == 1:
            return False  # different integers; decimals go on to math-verify, which rounds them
    answer_number, reference_number = _without_percent(answer), _without_percent(reference)
    if (answer_number or reference_number) and answers_match(
        answer_number or answer, reference_number or reference
    ):
        return True  # "12.5\%" for "12.5"; "50\%" for "0.5" is math-verify's rule below
    gold, predicted = _parse_reference(reference), _parse(answer)
    if _explosive(gold) or _explosive(predicted):  # compare the unevaluated forms only
        return any(g == p for g in gold for p in predicted if isinstance(g, sympy.Basic))
    if _false_numeric_equation(predicted):
        return False
    return verify(_imaginary_unit(gold), _imaginary_unit(predicted), timeout_seconds=None)


def _false_numeric_equation(parsed: list) -> bool:
    """Whether the answer equates two different numbers (``2 - 1 = 3``, ``x = 5 = 3``). math-verify compares an
    equation's right side alone, so without this check a policy is paid for a false statement that ends in the
    reference; ``x = 3`` and true working such as ``1 + 2 = 3`` still count."""
    for item in parsed:
        if not isinstance(item, sympy.Basic):
            continue
        for equation in item.atoms(sympy.Eq):
            if not equation.free_symbols and sympy.simplify(equation.lhs - equation.rhs) != 0:
                return True
    return False


_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")


def plain_number(answer: str) -> Fraction | None:
    """The exact value of an answer that is a plain integer or decimal (``1,000`` and ``1{,}000`` included),
    else ``None``. Most GSM8K and MATH answers are, and Fractions compare them without sympy."""
    normalized = normalize(answer).replace("{,}", ",")
    if not _PLAIN_NUMBER.fullmatch(normalized):
        return None
    return Fraction(normalized.replace(",", ""))


def _without_percent(answer: str) -> str | None:
    normalized = normalize(answer)
    for sign in ("\\%", "%"):
        if normalized.endswith(sign):
            return normalized.removesuffix(sign)
    return None


def _imaginary_unit(parsed: list) -> list:
    """The parser reads ``i`` as a non-real variable; in a final answer it is the imaginary unit (i^2 = -1)."""

    def substitute(item: object) -> object:
        if not isinstance(item, sympy.Basic):
            return item
        return item.subs({symbol: sympy.I for symbol in item.free_symbols if symbol.name == "i"})

    return [substitute(item) for item in parsed]


def is_correct(completion: str, reference: str, modes: Sequence[str] = EXTRACTION_MODES) -> bool:
    """Unbounded check of one completion (call it through ``math_accuracy`` or a pool for a time bound)."""
    answers = final_answers(completion, modes)
    target = reference_answer(reference)
    return bool(answers) and all(answers_match(answer, target) for answer in answers)


@register("math_accuracy")
def math_accuracy(
    prompts: list,
    completions: list,
    answer: list[str | None],
    modes: Sequence[str] = EXTRACTION_MODES,
    timeout_s: float = 1.0,
    **columns: object,
) -> list[float | None]:
    """1.0 if the completion's final answer equals the reference in column ``answer``, else 0.0.

    ``None`` where the reference is ``None`` (the reward does not apply, e.g. a code prompt in a mixed
    dataset), or where the checker itself failed (logged).

    Called directly (e.g. by TRL), each check runs in a pool worker killed after ``timeout_s`` and then
    scores 0.0: an answer that cannot be checked in that time is not a reference answer. Inside a
    ``RewardRunner`` the runner's deadline applies instead, and a killed check is ``None`` (counted, logged,
    left out of the group statistics) like any failed reward; answers that would take sympy forever to
    evaluate (power towers) are caught before that by the magnitude screen and score 0.0.
    """
    if len(answer) != len(completions):
        raise ValueError(
            f"math_accuracy: column 'answer' has {len(answer)} rows for {len(completions)} completions"
        )
    rows = [i for i, reference in enumerate(answer) if reference is not None]
    outcomes = run_bounded(
        [
            Call(is_correct, (message_text(completions[i]), str(answer[i]), tuple(modes)), timeout_s)
            for i in rows
        ]
    )
    scores: list[float | None] = [None] * len(completions)
    for i, outcome in zip(rows, outcomes, strict=True):
        if outcome.timed_out or outcome.ok:
            scores[i] = 1.0 if outcome.value else 0.0
        else:  # a bug of ours or of a parser, not the policy's doing: no score, and say why
            logger.warning("math_accuracy: row %d could not be checked: %s", i, outcome.error)
    return scores
