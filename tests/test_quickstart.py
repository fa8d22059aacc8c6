"""The bundled main job's wiring on a tiny budget: the SFT recipe trains (its loss falls), the GRPO recipe starts
from the SFT model, evaluates before and after on the held-out prompts, and both land in summary.json and the
reports. The full-length run and its held-out gain are a benchmark: bench/quickstart.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.metrics import read_metrics
from posttrain.quickstart import run_quickstart, split_overrides

STEPS = 8  # optimiser steps of each recipe: train.max_steps is a key both have
TINY_BUDGET = [
    f"train.max_steps={STEPS}",
    "train.seed=3",
    "logging.progress=false",
    "logging.tensorboard=false",
    "checkpoint.every=0",
    # SFT only
    "packing.capacity=256",
    "train.micro_batch_size=4",
    "train.warmup_steps=2",
    # GRPO only
    "grpo.prompts_per_step=2",
    "grpo.num_generations=4",
    "grpo.micro_batch_size=8",
    "generation.max_tokens=16",
    "eval.max_prompts=6",
    "eval.samples=2",
]


def test_overrides_go_to_the_recipes_that_have_their_section():
    sft, grpo = split_overrides(
        ["train.seed=1", "packing.capacity=256", "grpo.prompts_per_step=4", "eval.samples=2", "data.train=x"]
    )
    assert sft == ["train.seed=1", "packing.capacity=256", "data.train=x"]
    assert grpo == ["train.seed=1", "grpo.prompts_per_step=4", "eval.samples=2", "data.train=x"]


@pytest.mark.slow  # ~16 s of CPU: two runs' start-up, tokenising 4,000 rows, two report figures
def test_quickstart_wiring_on_a_tiny_budget(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # the recipes name data/ and recipes/ relative to the repository
    out = tmp_path / "quickstart"
    summary = run_quickstart(str(out), "recipes", TINY_BUDGET)

    sft_rows = [row for row in read_metrics(out / "sft" / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in sft_rows] == list(range(1, STEPS + 1))
    assert sft_rows[-1]["loss"] < 0.8 * sft_rows[0]["loss"]  # measured 8.3 -> 5.0: the packed SFT step learns
    assert sft_rows[0]["mtp_loss"] > 0  # the DeepSeek-V3's MTP module is trained alongside

    grpo_recipe = yaml.safe_load((out / "grpo" / "recipe.yaml").read_text())
    assert grpo_recipe["model"]["path"] == summary["sft_model"]  # GRPO starts from the SFT model
    assert grpo_recipe["train"]["seed"] == 3 and grpo_recipe["grpo"]["prompts_per_step"] == 2
    assert yaml.safe_load((out / "sft" / "recipe.yaml").read_text())["packing"]["capacity"] == 256

    grpo_rows = read_metrics(out / "grpo" / "metrics.jsonl")
    evals = [row for row in grpo_rows if "eval/accuracy" in row]
    assert [row["step"] for row in evals] == [0, STEPS]  # before GRPO and after its last step
    assert summary["held_out_accuracy_after_sft"] == evals[0]["eval/accuracy"]
    assert summary["held_out_accuracy_after_grpo"] == evals[-1]["eval/accuracy"]
    assert all(0.0 <= row["eval/accuracy"] <= 1.0 for row in evals)
    assert sum("reward/mean" in row for row in grpo_rows) == STEPS

    assert summary["sft_wall_s"] > 0 and summary["grpo_wall_s"] > 0
    assert all(Path(report).stat().st_size > 10_000 for report in summary["reports"])
    assert json.loads((out / "summary.json").read_text()) == summary
