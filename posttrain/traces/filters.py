"""Readability filters for teacher traces (DeepSeek-V3 §5.1: R1 data "filtered for overthinking, poor
formatting and excessive length"; DeepSeek-R1 §2.3.2: no mixed languages, long paragraphs or code-switching).

Each filter is a small pure function of one sample that returns None when the sample passes and a short
reason when it does not, so the verdicts written next to every sample say why it was dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from rewards.format import r1_format

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def max_length(num_tokens: int, limit: int, finish_reason: str) -> str | None:
    """Reject completions longer than `limit` tokens, and those cut at the sampler's `max_tokens`."""
    if finish_reason == "length":
        return "truncated at max_tokens"
    if num_tokens > limit:
        return f"{num_tokens} tokens > {limit}"
    return None


def required_format(text: str, opened_by_prompt: bool = False) -> str | None:
    """R1's format: `<think>` reasoning `</think>` then a non-empty answer, one think block (the rule of the
    `r1_format` reward, so a sample kept here also earns that reward)."""
    if r1_format([""], [text], opened_by_prompt=opened_by_prompt)[0] == 1.0:
        return None
    return "not <think>reasoning</think> followed by an answer"


# Letters of these scripts count for no language: Greek letters are mathematics (π, θ, Σ) in any language.
NEUTRAL_SCRIPTS = frozenset({"GREEK"})
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_CODE_BLOCK = re.compile(r"```.*?```", re.DOTALL)
_TAGS = re.compile(r"</?(think|answer)>")


def letter_scripts(text: str) -> Counter[str]:
    """How many letters of each script `text` holds (the first word of the Unicode name: LATIN, CJK, …).

    LaTeX commands, code blocks and the think/answer tags are removed first: `\\boxed` or `def` in a Chinese
    answer is notation, not English.
    """
    text = _TAGS.sub(" ", _LATEX_COMMAND.sub(" ", _CODE_BLOCK.sub(" ", text)))
    counts: Counter[str] = Counter()
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "UNKNOWN")
            script = name.split(" ")[0]
            # Kana and Han both write Japanese; the Unicode names say HIRAGANA/KATAKANA/CJK.
            counts["CJK" if script in ("HIRAGANA", "KATAKANA") else script] += 1
    return counts


def dominant_script(counts: Counter[str], min_share: float) -> str | None:
    """The script holding at least `min_share` of the non-neutral letters, or None (no letters, or mixed)."""
    relevant = {s: n for s, n in counts.items() if s not in NEUTRAL_SCRIPTS}
    total = sum(relevant.values())
    if not total:
        return None
    script, count = max(relevant.items(), key=lambda item: item[1])
    return script if count / total >= min_share else None


def language_consistency(prompt: str, response: str, max_foreign_share: float = 0.05) -> str | None:
    """When the prompt is written in one script, the response's letters must be in that script too:

        foreign share = #letters of other (non-neutral) scripts / #non-neutral letters of the response

    must not exceed `max_foreign_share`. A prompt that mixes scripts (no script above 95%) sets no rule.
    """
    language = dominant_script(letter_scripts(prompt), min_share=0.95)
    if language is None:
        return None
    counts = letter_scripts(response)
    total = sum(n for s, n in counts.items() if s not in NEUTRAL_SCRIPTS)
    foreign = total - counts.get(language, 0)
    if total and foreign / total > max_foreign_share:
        others = ", ".join(s for s in counts if s not in NEUTRAL_SCRIPTS and s != language)
        return f"mixed scripts: {foreign / total:.0%} of letters in {others} (prompt is {language})"
    return None


def repeated_ngram_fraction(tokens: list, n: int) -> float:
    """1 − |distinct n-grams| / |n-grams|: 0 for text that never repeats an n-gram, → 1 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def repetition(token_ids: list[int], n: int, max_fraction: float) -> str | None:
    """Reject degenerate loops: more than `max_fraction` of the completion's token n-grams are repeats."""
    fraction = repeated_ngram_fraction(token_ids, n)
    if fraction > max_fraction:
        return f"{fraction:.0%} of {n}-grams repeated > {max_fraction:.0%}"
    return None


def overthinking(
    think_tokens: int,
    max_think_tokens: int | None,
    shortest_correct_think: int | None,
    max_ratio: float | None,
) -> str | None:
    """Cap the reasoning: at most `max_think_tokens` think tokens, and at most `max_ratio` times the think
    length of the shortest verified sample of the same prompt (the teacher showed it can be solved in that)."""
    if max_think_tokens is not None and think_tokens > max_think_tokens:
        return f"{think_tokens} think tokens > {max_think_tokens}"
    if max_ratio is not None and shortest_correct_think:
        if think_tokens > max_ratio * shortest_correct_think:
            return (
                f"{think_tokens} think tokens > {max_ratio:g} x shortest correct ({shortest_correct_think})"
            )
    return None


def split_think(text: str, opened_by_prompt: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of an R1-style response; reasoning is "" when there is no closed think block."""
    body = text if opened_by_prompt else text.lstrip().removeprefix(THINK_OPEN)
    reasoning, closed, answer = body.partition(THINK_CLOSE)
    return (reasoning, answer) if closed else ("", text)
