"""Format and shaping rewards. Each has its formula in its docstring; lengths ``L`` are in tokens, taken from
the ``completion_ids`` column that the GRPO trainers (ours and TRL's) pass to every reward."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence

from rewards.math import EXTRACTION_MODES, math_accuracy
from rewards.registry import message_text, register


def _texts(completions: list) -> list[str]:
    return [message_text(completion) for completion in completions]


def _token_lengths(completion_ids: list | None, reward: str) -> list[int]:
    if completion_ids is None:
        raise ValueError(
            f"{reward} needs the 'completion_ids' column (the token ids of each completion) to measure lengths"
        )
    return [len(ids) for ids in completion_ids]


_THINK_TAG = re.compile(r"</?think>")
_ANSWER_TAG = re.compile(r"</?answer>")


@register("r1_format")
def r1_format(
    prompts: list,
    completions: list,
    require_answer_tags: bool = False,
    opened_by_prompt: bool = False,
    **columns,
) -> list[float | None]:
    """DeepSeek-R1's format: ``<think>reasoning</think>`` then a non-empty answer.

    r = 1 if the completion is ``<think>`` R ``</think>`` A, where R and A are non-empty and hold no think tag
    (with ``require_answer_tags``: A is ``<answer>`` X ``</answer>``, X non-empty without answer tags); else 0.
    ``opened_by_prompt``: the chat template already wrote ``<think>``, so the completion starts with R.
    """

    def well_formed(text: str) -> bool:
        text = text.lstrip()
        if not opened_by_prompt:
            if not text.startswith("<think>"):
                return False
            text = text.removeprefix("<think>")
        reasoning, closed, answer = text.partition("</think>")
        answer = answer.strip()
        if not (closed and reasoning.strip() and answer) or _THINK_TAG.search(reasoning + answer):
            return False
        if not require_answer_tags:
            return True
        inner = answer.removeprefix("<answer>").removesuffix("</answer>")
        return (
            len(inner) == len(answer) - len("<answer></answer>")
            and bool(inner.strip())
            and not _ANSWER_TAG.search(inner)
        )

    return [float(well_formed(text)) for text in _texts(completions)]


@register("tag_count")
def tag_count(
    prompts: list,
    completions: list,
    tags: Sequence[str] = ("<think>", "</think>", "<answer>", "</answer>"),
    **columns,
) -> list[float | None]:
    """Partial credit for the format's tags: r = (1/|T|) * sum over tags t in T of [count(t) == 1]."""
    return [sum(text.count(tag) == 1 for tag in tags) / len(tags) for text in _texts(completions)]


@register("repetition_penalty")
def repetition_penalty(
    prompts: list, completions: list, ngram: int = 3, max_penalty: float = -1.0, **columns
) -> list[float | None]:
    """N-gram repetition penalty (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning"):

    r = max_penalty * (1 - |distinct n-grams| / |n-grams|) over the completion's lower-cased words;
    r = 0 for a completion shorter than ``ngram`` words.
    """
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")
    scores = []
    for text in _texts(completions):
        words = text.lower().split()
        grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
        scores.append(max_penalty * (1 - len(set(grams)) / len(grams)) if grams else 0.0)
    return scores


def cosine_schedule(length: int, max_length: int, value_at_zero: float, value_at_max: float) -> float:
    """r(L) = v_max + (v_0 - v_max) * (1 + cos(pi * min(L, L_max) / L_max)) / 2: v_0 at L = 0, v_max at L_max."""
    progress = min(length, max_length) / max_length
    return value_at_max + 0.5 * (value_at_zero - value_at_max) * (1 + math.cos(math.pi * progress))


@register("cosine_length")
def cosine_length(
    prompts: list,
    completions: list,
    answer: list,
    completion_ids: list | None = None,
    max_length: int = 1024,
    correct: tuple[float, float] = (1.0, 0.5),
    wrong: tuple[float, float] = (-1.0, -0.5),
    modes: Sequence[str] = EXTRACTION_MODES,
    **columns,
) -> list[float | None]:
    """Cosine length scaling of the accuracy reward (Yeo et al. 2025):

    r = cosine_schedule(L, L_max, *correct) for a correct answer (short correct answers earn most),
    r = cosine_schedule(L, L_max, *wrong) for a wrong one (short wrong answers lose most, so the policy
    thinks longer when it is unsure); ``None`` where ``math_accuracy`` is ``None``. Lengths beyond
    ``max_length`` count as ``max_length``.
    """
    lengths = _token_lengths(completion_ids, "cosine_length")
    accuracy = math_accuracy(prompts, completions, answer, modes=modes)
    return [
        None if acc is None else cosine_schedule(length, max_length, *(correct if acc else wrong))
        for acc, length in zip(accuracy, lengths, strict=True)
    ]


@register("dapo_overlong")
def dapo_overlong(
    prompts: list,
    completions: list,
    completion_ids: list | None = None,
    max_length: int = 1024,
    cache_length: int = 256,
    **columns,
) -> list[float | None]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L_max = ``max_length`` and
    L_cache = ``cache_length``:

    r = 0                                   if L <= L_max - L_cache
    r = ((L_max - L_cache) - L) / L_cache   if L_max - L_cache < L <= L_max
    r = -1                                  if L > L_max
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length} and {max_length}")
    free = max_length - cache_length
    scores = []
    for length in _token_lengths(completion_ids, "dapo_overlong"):
        if length <= free:
            scores.append(0.0)
        elif length <= max_length:
            scores.append((free - length) / cache_length)
        else:
            scores.append(-1.0)
    return scores


@register("length_penalty", batched=True)
def length_penalty(
    prompts: list,
    completions: list,
    answer: list,
    completion_ids: list | None = None,
    modes: Sequence[str] = EXTRACTION_MODES,
    **columns,
) -> list[float | None]:
    """Kimi k1.5's length reward, relative to the other completions of the same prompt:

    lambda = 0.5 - (L - L_min) / (L_max - L_min), with L_min, L_max over the prompt's completions;
    r = lambda for a correct answer, min(0, lambda) for a wrong one; r = 0 when all lengths are equal;
    ``None`` where ``math_accuracy`` is ``None``. Needs whole groups, so it is called once per batch (in a
    runner, its answer checks then share the deadline of that one call).
    """
    lengths = _token_lengths(completion_ids, "length_penalty")
    accuracy = math_accuracy(prompts, completions, answer, modes=modes)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[repr(prompt)].append(i)
    scores: list[float | None] = [None] * len(completions)
    for members in groups.values():
        shortest, longest = min(lengths[i] for i in members), max(lengths[i] for i in members)
        for i in members:
            if accuracy[i] is None:
                continue
            lam = 0.5 - (lengths[i] - shortest) / (longest - shortest) if longest > shortest else 0.0
            scores[i] = lam if accuracy[i] else min(0.0, lam)
    return scores
