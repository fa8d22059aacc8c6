"""Sampling completions and scoring them with the recipe's reward functions: what GRPO, trace generation and
held-out evaluation share.

  - `make_reward_runner`: the recipe's rewards in a bounded worker pool (`rewards.RewardRunner`);
  - `score`: totals (NaN where no reward) and per-function scores of completions, with their prompts' columns;
  - `collect_rollouts`: G completions per prompt, scored; with dynamic sampling (DAPO), groups whose rewards are
    all equal are replaced by fresh prompts' groups;
  - `evaluate`: held-out accuracy, greedy or pass@1 over samples.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from posttrain.algorithms.grpo import zero_variance_groups
from posttrain.config import AccuracyEvalSection, GenerationSection, GRPORecipe, RewardsSection
from posttrain.data.prompts import PromptSet
from posttrain.generation.base import Backend, Completion
from posttrain.generation.factory import sampling_params

log = logging.getLogger(__name__)


def make_reward_runner(rewards: RewardsSection) -> Any:
    """The recipe's reward functions in a bounded worker pool (`rewards.RewardRunner`); close it when done."""
    from rewards import RewardRunner, RewardSpec

    specs = [
        RewardSpec(r.name, r.weight, dict(r.kwargs), r.timeout_s, completions_as=r.completions_as)
        for r in rewards.functions
    ]
    return RewardRunner(specs, workers=rewards.workers, timeout_s=rewards.timeout_s)


def score(runner: Any, prompts: PromptSet, completions: list[Completion]) -> tuple[torch.Tensor, dict, int]:
    """Row i of `prompts` with completion i: the [N] float64 totals (NaN where no reward), each function's
    scores (None where it failed) and the number of failed calls; the first failures are logged."""
    columns = {**prompts.columns, "completion_ids": [c.token_ids for c in completions]}
    scores = runner.score(prompts.messages, [c.text for c in completions], columns)
    for failure in scores.failures[:5]:
        log.warning(
            "reward %s failed on sample %d: %s", failure.reward, failure.sample, failure.message[:300]
        )
    rewards = torch.tensor([math.nan if r is None else r for r in scores.total], dtype=torch.float64)
    return rewards, scores.per_function, len(scores.failures)


@dataclass
class RolloutBatch:
    """G completions for each of a step's prompts, flattened prompt-major, scored."""

    prompts: PromptSet  # one row per completion (each prompt repeated G times)
    completions: list[Completion]
    rewards: torch.Tensor  # [N], NaN where no reward
    per_function: dict[str, list[float | None]]
    failures: int


def collect_rollouts(
    backend: Backend, runner: Any, prompts: PromptSet, recipe: GRPORecipe, seed: int, refill: PromptSet | None
) -> tuple[RolloutBatch, dict[str, float]]:
    """Generate and score; with dynamic sampling, replace groups whose rewards are all equal by fresh prompts."""
    g = recipe.grpo.num_generations
    params = sampling_params(recipe.generation, g, seed)
    t0 = time.perf_counter()
    groups = backend.generate(prompts.prompt_ids, params)
    t_gen = time.perf_counter() - t0
    expanded = prompts.select([i for i in range(len(prompts)) for _ in range(g)])
    completions = [c for group in groups for c in group]
    rewards, per_function, failures = score(runner, expanded, completions)
    t_reward = time.perf_counter() - t0 - t_gen
    keep, frac_zero = zero_variance_groups(rewards, g)
    stats = {
        "frac_zero_variance_groups": float(frac_zero),
        "time/generation_s": t_gen,
        "time/rewards_s": t_reward,
    }
    if recipe.grpo.dynamic_sampling and refill is not None:
        rounds = 0
        cursor = 0
        while not bool(keep.all()) and rounds < recipe.grpo.max_refill_rounds and cursor < len(refill):
            rounds += 1
            missing = int((~keep).sum())
            extra = refill.select(list(range(cursor, min(cursor + missing, len(refill)))))
            cursor += len(extra)
            more = backend.generate(
                extra.prompt_ids, sampling_params(recipe.generation, g, seed + 7919 * rounds)
            )
            extra_rows = extra.select([i for i in range(len(extra)) for _ in range(g)])
            extra_completions = [c for group in more for c in group]
            extra_rewards, extra_per_function, extra_failures = score(runner, extra_rows, extra_completions)
            extra_keep, _ = zero_variance_groups(extra_rewards, g)
            slots = [int(i) for i in torch.nonzero(~keep).flatten()]
            informative = [k for k in range(len(extra)) if bool(extra_keep[k])]
            for slot, k in zip(slots, informative, strict=False):  # fill the first free slots in order
                rows = list(range(slot * g, (slot + 1) * g))
                new_rows = list(range(k * g, (k + 1) * g))
                for r, nr in zip(rows, new_rows, strict=True):
                    completions[r] = extra_completions[nr]
                    rewards[r] = extra_rewards[nr]
                    for name in per_function:
                        per_function[name][r] = extra_per_function[name][nr]
                    for key in expanded.columns:
                        expanded.columns[key][r] = extra_rows.columns[key][nr]
                    expanded.messages[r] = extra_rows.messages[nr]
                    expanded.prompt_ids[r] = extra_rows.prompt_ids[nr]
                keep[slot] = True
            failures += extra_failures
        stats["dynamic_sampling/refill_rounds"] = rounds
        stats["dynamic_sampling/kept_groups_frac"] = float(keep.float().mean())
    return RolloutBatch(expanded, completions, rewards, per_function, failures), stats


def evaluate(
    backend: Backend, runner: Any, prompts: PromptSet, generation: GenerationSection, cfg: AccuracyEvalSection
) -> dict[str, float]:
    """Held-out accuracy: greedy, or pass@1 averaged over `cfg.samples` samples at `cfg.temperature`."""
    greedy = cfg.temperature == 0
    params = sampling_params(generation, 1 if greedy else cfg.samples, seed=0, greedy=greedy)
    if not greedy:
        params.temperature = cfg.temperature
    groups = backend.generate(prompts.prompt_ids, params)
    rows = prompts.select([i for i, group in enumerate(groups) for _ in group])
    rewards, per_function, _ = score(runner, rows, [c for group in groups for c in group])
    result = {"eval/reward": float(np.nanmean(rewards.numpy())) if len(rewards) else float("nan")}
    values = per_function.get(cfg.accuracy_reward)
    if values is not None:
        result["eval/accuracy"] = float(np.mean([1.0 if (v or 0) > 0.5 else 0.0 for v in values]))
    return result
