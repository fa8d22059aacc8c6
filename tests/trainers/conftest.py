"""Scaffolding of the trainer tests that run two real GRPO steps of a recipe, read as `posttrain grpo` reads it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from posttrain.config import GRPORecipe, load_recipe
from posttrain.trainers.grpo import train_grpo

TwoGRPOSteps = Callable[..., tuple[Path, list[dict]]]


@pytest.fixture
def two_grpo_steps(tmp_path: Path) -> TwoGRPOSteps:
    """`run(model=..., train=..., generation=..., rewards=[...], grpo=..., lr=...)` writes the recipe to a YAML
    file under tmp_path, trains two GRPO steps (one reward worker, no tensorboard or progress bar) and returns
    the saved model's directory and the metric rows of the training steps."""

    def run(
        *, model: dict, train: Path, generation: dict, rewards: list[dict], grpo: dict, lr: float
    ) -> tuple[Path, list[dict]]:
        output_dir = tmp_path / "grpo"
        recipe = {
            "model": model,
            "data": {"train": str(train)},
            "generation": generation,
            "rewards": {"functions": rewards, "workers": 1},
            "grpo": grpo,
            "train": {"max_steps": 2, "lr": lr, "min_lr": lr},
            "logging": {"tensorboard": False, "progress": False},
            "output_dir": str(output_dir),
        }
        path = tmp_path / "grpo.yaml"
        path.write_text(yaml.safe_dump(recipe))
        model_dir = train_grpo(load_recipe(path, GRPORecipe))
        rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        return model_dir, [row for row in rows if "loss" in row]

    return run
