"""Rollout collection: dynamic sampling replaces flat groups by fresh prompts, rewards stay with their rows."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from posttrain.config import GRPORecipe
from posttrain.data.prompts import PromptSet
from posttrain.generation.base import Completion, SamplingParams
from posttrain.rollouts import collect_rollouts
from posttrain.trainers.grpo_layouts import completion_tensors


class ScriptedBackend:
    """Prompt k's completions are "k-0", "k-1", ...; deterministic, no model."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        return [
            [Completion([ids[0], j], f"{ids[0]}-{j}", [-0.5, -0.25], "stop") for j in range(params.n)]
            for ids in prompt_ids
        ]


class ScriptedRunner:
    """Prompts with an even id get rewards 0, 1, 0, 1 (informative); odd ids get all-equal rewards."""

    def score(self, prompts, completions, columns):
        totals = []
        for text in completions:
            prompt, j = map(int, text.split("-"))
            totals.append(float(j % 2) if prompt % 2 == 0 else 1.0)
        return SimpleNamespace(total=totals, per_function={"scripted": list(totals)}, failures=[])


def prompts(ids: list[int]) -> PromptSet:
    return PromptSet(
        messages=[[{"role": "user", "content": str(i)}] for i in ids],
        prompt_ids=[[i] for i in ids],
        columns={"answer": [str(i) for i in ids]},
        sources=["test"] * len(ids),
    )


def recipe(dynamic: bool) -> GRPORecipe:
    return GRPORecipe.model_validate(
        {
            "model": {"path": "unused"},
            "data": {"train": "unused"},
            "rewards": {"functions": [{"name": "scripted"}]},
            "grpo": {"num_generations": 4, "dynamic_sampling": dynamic},
            "output_dir": "unused",
        }
    )


def test_without_dynamic_sampling_flat_groups_are_kept_and_counted():
    batch, stats = collect_rollouts(
        ScriptedBackend(), ScriptedRunner(), prompts([2, 3]), recipe(False), 0, None
    )
    assert stats["frac_zero_variance_groups"] == 0.5
    assert batch.rewards.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_dynamic_sampling_refills_flat_groups_with_fresh_informative_prompts():
    batch, stats = collect_rollouts(
        ScriptedBackend(), ScriptedRunner(), prompts([2, 3, 5]), recipe(True), 0, prompts([7, 4, 9, 6])
    )
    # groups of 3 and 5 are flat: round 1 fetches 7 (flat) and 4 (kept), round 2 fetches 9 (flat), round 3 6
    assert [p[0] for p in batch.prompts.prompt_ids[::4]] == [2, 4, 6]
    assert [c.text for c in batch.completions[4:8]] == ["4-0", "4-1", "4-2", "4-3"]
    assert batch.prompts.columns["answer"][4:8] == ["4"] * 4
    assert batch.rewards.tolist() == [0.0, 1.0] * 6
    assert stats["dynamic_sampling/kept_groups_frac"] == 1.0 and stats["dynamic_sampling/refill_rounds"] == 3


def test_completion_tensors_place_completions_after_their_prompts():
    batch, _ = collect_rollouts(ScriptedBackend(), ScriptedRunner(), prompts([2]), recipe(False), 0, None)
    tensors = completion_tensors(batch, pad_id=0, device=torch.device("cpu"))
    assert tensors["input_ids"][1].tolist() == [2, 2, 1]
    assert tensors["completion_mask"].all() and tensors["prompt_lens"].tolist() == [1] * 4
    assert tensors["sampler_logps"][0].tolist() == [-0.5, -0.25]


def test_chunked_completion_logprobs_equal_the_plain_ones(tiny_qwen2_config_path):
    """The fused head + log-softmax per chunk (the default path) gives the plain path's values and gradients."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.policy import Policy
    from posttrain.trainers.grpo_layouts import completion_logprobs

    torch.manual_seed(0)
    config = AutoConfig.for_model(**json.loads(open(tiny_qwen2_config_path).read()))
    policy = Policy(AutoModelForCausalLM.from_config(config))
    ids = torch.randint(3, 500, (3, 20))
    tensors = {
        "input_ids": ids,
        "prompt_lens": torch.tensor([5, 8, 6]),
        "completion_mask": torch.ones(3, 10, dtype=torch.bool),
    }
    results = []
    for chunk in (None, 7):
        policy.zero_grad()
        logps, entropy = completion_logprobs(policy, tensors, slice(0, 3), temperature=0.7, chunk_size=chunk)
        (logps.sum() + entropy.sum()).backward()
        results.append(
            (logps.detach(), entropy.detach(), policy.model.model.embed_tokens.weight.grad.clone())
        )
    for plain, chunked in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(chunked, plain, atol=2e-5, rtol=1e-5)
