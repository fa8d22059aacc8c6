"""The perturbed sampler of issue 10's experiment: it reports the log-probs of the distribution it really
sampled from, perturbs only its own copy, and the GRPO trainer sees (and logs) the gap it creates."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from posttrain.generation import SamplingParams, build_backend
from posttrain.generation.perturbed import PerturbedSampler, add_relative_noise_
from posttrain.generation.testing import forward_logprobs


def hf(model, tokenizer):
    return build_backend("hf", model=model, tokenizer=tokenizer)


def test_hotter_sampler_reports_the_log_probs_of_its_own_temperature(model, tokenizer, prompts):
    sampler = PerturbedSampler(hf(model, tokenizer), model, None, temperature_factor=1.5)
    params = SamplingParams(n=2, max_tokens=10, temperature=0.8, seed=0)
    for prompt, completions in zip(prompts, sampler.generate(prompts, params), strict=True):
        for completion in completions:
            reported = torch.tensor(completion.logprobs, dtype=torch.float64)
            sampled_at = forward_logprobs(model, prompt, completion.token_ids, 0.8 * 1.5)
            torch.testing.assert_close(reported, sampled_at, atol=1e-5, rtol=0)
            trainer_view = forward_logprobs(model, prompt, completion.token_ids, 0.8)
            assert (reported - trainer_view).abs().max() > 1e-2  # the gap the trainer will measure
    greedy = SamplingParams(max_tokens=8, temperature=0)
    assert sampler.generate(prompts, greedy) == hf(model, tokenizer).generate(prompts, greedy)


def test_relative_noise_has_the_requested_size_per_tensor():
    layer = torch.nn.Linear(256, 512)
    before = copy.deepcopy(layer)
    add_relative_noise_(layer, 0.05, torch.Generator().manual_seed(0))
    for name in ("weight", "bias"):
        old, new = getattr(before, name), getattr(layer, name)
        ratio = (new - old).pow(2).mean().sqrt() / old.pow(2).mean().sqrt()
        assert ratio.item() == pytest.approx(0.05, rel=0.1), name


def test_noisy_sampler_perturbs_only_its_copy_and_redraws_at_every_sync(model, tokenizer, prompts):
    clean_state = {k: v.clone() for k, v in model.state_dict().items()}
    clean = hf(model, tokenizer)
    sampler = PerturbedSampler(clean, model, lambda m: hf(m, tokenizer), weight_noise=0.02, seed=1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in clean_state.items())  # policy untouched
    first = {k: v.clone() for k, v in sampler.copy.state_dict().items()}
    assert not torch.equal(first["lm_head.weight"], clean_state["lm_head.weight"])
    sampler.sync_weights(model)
    second = sampler.copy.state_dict()
    assert not torch.equal(first["lm_head.weight"], second["lm_head.weight"])  # fresh noise per sync
    params = SamplingParams(n=2, max_tokens=10, temperature=1.0, seed=0)
    for prompt, completions in zip(prompts, sampler.generate(prompts, params), strict=True):
        for completion in completions:  # the reported log-probs are the noisy copy's
            reported = torch.tensor(completion.logprobs, dtype=torch.float64)
            noisy_view = forward_logprobs(sampler.copy, prompt, completion.token_ids, 1.0)
            torch.testing.assert_close(reported, noisy_view, atol=1e-5, rtol=0)


def grpo_run(tmp_path, policy_dir, repo_root, name: str, perturbation: dict | None) -> list[dict]:
    from posttrain.config import GRPORecipe
    from posttrain.trainers.grpo import train_grpo

    recipe = GRPORecipe.model_validate(
        {
            "model": {"path": str(policy_dir), "mtp": {"enabled": False}},
            "data": {
                "train": str(repo_root / "data/arith/rl.jsonl"),
                "eval": str(repo_root / "data/arith/test.jsonl"),
            },
            "generation": {"max_tokens": 10, "sampler_perturbation": perturbation},
            "rewards": {"functions": [{"name": "math_accuracy"}], "workers": 1},
            "grpo": {"prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 8},
            "train": {"max_steps": 2, "lr": 1e-3, "seed": 0},
            "eval": {"max_prompts": 4, "every": 0},
            "logging": {"tensorboard": False, "progress": False},
            "output_dir": str(tmp_path / name),
        }
    )
    out = train_grpo(recipe).parent
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_with_a_perturbed_sampler_logs_the_gap_and_evaluates_the_clean_policy(
    tmp_path, qwen2_dir, repo_root
):
    perturbed = grpo_run(tmp_path, qwen2_dir, repo_root, "perturbed", {"temperature_factor": 1.5})
    clean = grpo_run(tmp_path, qwen2_dir, repo_root, "clean", None)
    steps = {name: [r for r in history if "loss" in r] for name, history in (("p", perturbed), ("c", clean))}
    assert all(r["gap/mean_abs"] > 1e-2 for r in steps["p"]) and len(steps["p"]) == 2
    assert all(r["gap/mean_abs"] < 1e-4 for r in steps["c"])

    def evaluation(history: list[dict]) -> dict:
        first = next(r for r in history if "eval/reward" in r)
        return {k: v for k, v in first.items() if k.startswith("eval/")}

    # before any update both runs evaluate the same clean policy with the same seed: identical numbers
    assert evaluation(perturbed) == evaluation(clean)


def test_logit_bias_is_fixed_per_token_and_reported_in_the_log_probs(model, tokenizer, prompts):
    sampler = PerturbedSampler(
        hf(model, tokenizer), model, lambda m: hf(m, tokenizer), logit_bias_std=1.0, seed=2
    )
    bias = sampler.logit_bias.clone()
    assert bias.shape == (model.config.vocab_size,) and 0.8 < bias.std().item() < 1.2
    sampler.sync_weights(model)
    assert torch.equal(sampler.logit_bias, bias)  # systematic: the same offsets after every sync
    params = SamplingParams(n=2, max_tokens=8, temperature=0.7, seed=0)
    for prompt, completions in zip(prompts, sampler.generate(prompts, params), strict=True):
        for completion in completions:
            with torch.no_grad():
                ids = torch.tensor([prompt + completion.token_ids])
                logits = model(ids).logits[0, len(prompt) - 1 : -1].double() + bias.double()
            expected = torch.log_softmax(logits / 0.7, -1)[
                torch.arange(len(completion.token_ids)), completion.token_ids
            ]
            torch.testing.assert_close(
                torch.tensor(completion.logprobs, dtype=torch.float64), expected, atol=1e-5, rtol=0
            )
