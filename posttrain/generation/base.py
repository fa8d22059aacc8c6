"""The generation interface every rollout backend implements.

A backend turns tokenised prompts into `n` completions each, with the per-token log-probs the GRPO trainer
compares against its own. The log-prob of a generated token has ONE definition for every backend:

    logprob_t = log softmax(z_t / T)[y_t]

with z_t the model's logits at step t and T the sampling temperature, taken BEFORE top-p truncation (the
nucleus is a sampling device, not part of the policy the trainer differentiates). Temperature 0 means greedy
decoding, and its log-probs are those of the unscaled distribution (T = 1). With top_p = 1 this is exactly the
distribution the token was drawn from.

Stop strings and EOS end a completion with finish_reason "stop"; `max_tokens` ends it with "length". The token
ids keep every token the model generated, up to and including the one that completed the stop string (or the
EOS token), because that is what the trainer scores; the text is cut just before the stop string and never
contains EOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from posttrain.errors import UserError


@dataclass
class SamplingParams:
    """How to sample: `n` completions per prompt, at most `max_tokens` tokens each."""

    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must not contain empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The T of the log-prob definition: the sampling temperature, or 1 for greedy decoding."""
        return 1.0 if self.greedy else self.temperature


class SamplingRefused(UserError, ValueError):
    """The backend cannot sample with these parameters, whatever the prompts: retrying cannot help."""


@dataclass
class Completion:
    """One sampled continuation: tokens, their text, their log-probs (see the module docstring)."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


class Backend(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Return, for each prompt, a list of `params.n` completions."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the next `generate` use `model`'s current weights."""
        ...

    def close(self) -> None:
        """Release the engine (memory, threads, connections)."""
        ...


def check_prompts(prompt_ids: list[list[int]]) -> None:
    """Reject empty batches, empty prompts and non-integer ids with an error naming the prompt."""
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt, got an empty list")
    for index, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {index} is empty: every prompt needs at least one token id")
        if not all(isinstance(token, int) for token in ids):
            raise TypeError(f"prompt {index} must be a list of int token ids, got {ids[:8]!r}...")


def first_stop(text: str, stop: list[str]) -> int | None:
    """Character index where the earliest occurring stop string starts, or None."""
    found = [index for s in stop if (index := text.find(s)) != -1]
    return min(found) if found else None


def tokens_through_stop(tokens: list[int], stop: list[str], decode: Callable[[list[int]], str]) -> int:
    """Fewest leading tokens whose decoded text contains a stop string (binary search over prefixes).

    Engines that detokenise incrementally may notice a stop string a few tokens late (vLLM holds back text
    while a UTF-8 character is incomplete); cutting here gives every backend the same token ids.
    """
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if first_stop(decode(tokens[:middle]), stop) is None:
            low = middle + 1
        else:
            high = middle
    return low
