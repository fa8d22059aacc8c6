"""The GRPO trainer end to end on CPU: one recipe runs rollouts, rewards (a user's own function by dotted path
among them), the update and the report; a SIGKILLed run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config import GRPORecipe, load_recipe
from posttrain.trainers.grpo import train_grpo


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, repo_root) -> str:
    """A tiny Qwen2 with the bundled tokenizer, saved like a real checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model(**json.loads((repo_root / "recipes/models/tiny_qwen2.json").read_text()))
    path = tmp_path_factory.mktemp("policy")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(repo_root / "data/tokenizer").save_pretrained(path)
    return str(path)


def write_recipe(tmp_path: Path, policy: str, repo_root: Path, name: str, **grpo) -> Path:
    recipe = {
        "model": {"path": policy, "mtp": {"enabled": False}},
        "data": {
            "train": str(repo_root / "data/arith/rl.jsonl"),
            "eval": str(repo_root / "data/arith/test.jsonl"),
        },
        "generation": {"max_tokens": 12, "temperature": 1.0, "stop": ["<|im_end|>"]},
        "rewards": {
            "functions": [
                {"name": "math_accuracy", "weight": 1.0},
                # a user's reward, named by import path, never registered in the library
                {"name": "tests.trainers.custom_rewards:text_length_parity", "weight": 0.5},
            ],
            "workers": 2,
        },
        "grpo": {"prompts_per_step": 4, "num_generations": 4, "micro_batch_size": 8, **grpo},
        "train": {"max_steps": 4, "lr": 1e-3, "min_lr": 1e-3, "seed": 3},
        "eval": {"max_prompts": 4},
        "logging": {"tensorboard": False, "progress": False},
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_run_logs_rewards_gap_and_kl_and_writes_a_report(tmp_path, tiny_policy, repo_root):
    path = write_recipe(tmp_path, tiny_policy, repo_root, "run", num_iterations=2, loss={"beta": 0.05})
    model_dir = train_grpo(load_recipe(path, GRPORecipe))
    history = rows(model_dir.parent)
    steps = [r for r in history if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    evals = [r for r in history if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4]
    for r in steps:
        for key in (
            "reward/math_accuracy",
            "reward/tests.trainers.custom_rewards:text_length_parity",
            "kl",
            "entropy",
            "gap/mean_abs",
        ):
            assert key in r, key
        # the transformers backend samples from the trainer's own module: the rollout gap is numerical noise
        assert r["gap/max_abs"] < 1e-4
        assert r["completion_length/max"] <= 12
    assert steps[-1]["kl"] > 1e-6  # the policy leaves the reference as it trains
    assert min(r["frac_zero_variance_groups"] for r in steps) < 1  # so there was something to learn
    assert (model_dir.parent / "report.png").exists()
    assert (model_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_grpo_learns_what_its_reward_asks_for(tmp_path, tiny_policy, repo_root):
    """A random policy rewarded for digits learns to write digits (about 2% of its tokens at the start)."""
    path = write_recipe(tmp_path, tiny_policy, repo_root, "learn")
    overrides = [
        "rewards.functions=[{name: 'tests.trainers.custom_rewards:digit_fraction'}]",
        "generation.max_tokens=24",
        "grpo.prompts_per_step=8",
        "grpo.num_generations=8",
        "grpo.micro_batch_size=64",
        "train.max_steps=15",
        "train.lr=1e-2",
        "train.min_lr=1e-2",
        "data.eval=[]",
    ]
    train_grpo(load_recipe(path, GRPORecipe, overrides))
    rewards = [r["reward/mean"] for r in rows(tmp_path / "learn") if "loss" in r]
    assert len(rewards) == 15
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 0.3 and last > 3 * first, rewards


@pytest.mark.slow
def test_grpo_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_policy, repo_root):
    settings = {"num_iterations": 1}
    # The reference runs in its own process too: bitwise equality needs the same torch thread count, which
    # earlier tests in this process (vLLM engines) may have changed.
    reference_recipe = write_recipe(tmp_path, tiny_policy, repo_root, "ref", **settings)
    subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "grpo", str(reference_recipe), "train.max_steps=4"],
        check=True,
        timeout=600,
        capture_output=True,
    )
    reference = tmp_path / "ref" / "model"

    recipe = write_recipe(tmp_path, tiny_policy, repo_root, "killed", **settings)
    overrides = ["checkpoint.every=2", "train.max_steps=4"]
    command = [sys.executable, "-m", "posttrain.cli", "grpo", str(recipe), *overrides]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints.exists() and any(p.name == "step_00000002" for p in checkpoints.iterdir())):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model").exists()
    subprocess.run([*command, "--resume"], check=True, timeout=600, capture_output=True)
    expected, resumed = (
        load_file(str(reference / "model.safetensors")),
        load_file(str(tmp_path / "killed/model/model.safetensors")),
    )
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=0, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_with_colocated_vllm_keeps_the_engine_on_the_trainers_weights(tmp_path, tiny_policy, repo_root):
    """After every optimiser step the new weights are pushed into vLLM: if a sync were missed, the engine would
    sample from stale weights and its log-probs would drift away from the trainer's (lr 1e-3 moves them by far
    more than the 1e-3 bound below within one step)."""
    pytest.importorskip("vllm")
    path = write_recipe(tmp_path, tiny_policy, repo_root, "vllm")
    recipe = load_recipe(path, GRPORecipe, ["generation.backend=vllm", "train.max_steps=3", "data.eval=[]"])
    train_grpo(recipe)
    steps = [r for r in rows(tmp_path / "vllm") if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["gap/max_abs"] < 1e-3, r
    assert all(r["grad_norm"] > 0 for r in steps)  # the weights moved every step, and vLLM followed


def test_grpo_refuses_compiled_blocks_with_a_backend_that_decodes_with_them(tmp_path, tiny_policy, repo_root):
    path = write_recipe(tmp_path, tiny_policy, repo_root, "compiled")
    recipe = load_recipe(path, GRPORecipe, ["train.compile_blocks=true", "generation.backend=hf"])
    with pytest.raises(ValueError, match="train.compile_blocks with generation.backend 'hf'"):
        train_grpo(recipe)
