"""posttrain's own DeepSeek-V3 through the trainers: packed SFT with native MTP and expert-bias balancing, and
GRPO whose rollouts come from absorbed-MLA decoding over the latent cache and agree with the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.model import DeepseekV3ForCausalLM


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_with_native_mtp_learns_and_balances_experts(quickstart_sft_model):
    """The session's quickstart SFT run (tests/conftest.py): packed SFT of posttrain's DeepSeek-V3."""
    sft_model = quickstart_sft_model
    rows = metrics(sft_model.parent)
    assert len(rows) == yaml.safe_load((sft_model.parent / "recipe.yaml").read_text())["train"]["max_steps"]
    assert all("mtp_loss" in r and "moe/max_over_mean_load" in r for r in rows)
    first, last = rows[0], rows[-1]
    assert last["main_loss"] < 0.7 * first["main_loss"] and last["mtp_loss"] < 0.8 * first["mtp_loss"]
    model = DeepseekV3ForCausalLM.from_pretrained(sft_model)
    assert len(model.model.mtp_layers) == 1  # the MTP module is saved as layer num_hidden_layers
    biases = [m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    assert biases and any(float(b.abs().max()) > 0 for b in biases)  # the balancing bias moved


@pytest.mark.slow
def test_grpo_rollouts_from_the_latent_cache_agree_with_the_trainer(
    quickstart_sft_model, two_grpo_steps, repo_root
):
    _, rows = two_grpo_steps(
        model={"path": str(quickstart_sft_model), "implementation": "posttrain"},
        train=repo_root / "data/arith/rl.jsonl",
        generation={"max_tokens": 16, "stop": ["<|im_end|>"]},
        rewards=[{"name": "math_accuracy"}, {"name": "tag_count", "weight": 0.5}],
        grpo={"prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 8},
        lr=1e-4,
    )
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        # issue 10's bar: sampler and trainer agree within 1e-3 nats per token on DeepSeek-architecture policies
        assert row["gap/max_abs"] < 1e-3, row["gap/max_abs"]
