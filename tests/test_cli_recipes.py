"""Recipes: every mistake is reported with the file and the key, before any model is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from posttrain.config import GRPORecipe, RecipeError, SFTRecipe, load_recipe


@pytest.fixture
def recipe_file(tmp_path, repo_root):
    def write(**changes):
        recipe = {
            "model": {
                "from_config": str(repo_root / "recipes/models/tiny_qwen2.json"),
                "tokenizer": str(repo_root / "data/tokenizer"),
            },
            "data": {"train": str(repo_root / "data/arith/sft.jsonl")},
            "output_dir": str(tmp_path / "out"),
        }
        for dotted, value in changes.items():
            node = recipe
            *parents, leaf = dotted.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def test_valid_recipe_and_typed_overrides(recipe_file):
    recipe = load_recipe(
        recipe_file(), SFTRecipe, ["train.lr=3e-4", "packing.enabled=false", "train.betas=[0.9, 0.99]"]
    )
    assert recipe.train.lr == 3e-4 and recipe.packing.enabled is False and recipe.train.betas == (0.9, 0.99)
    assert recipe.data.train[0].endswith("sft.jsonl")


def test_unknown_key_names_the_file_and_the_key(recipe_file):
    path = recipe_file(train__learning_rate=1e-5)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, SFTRecipe)
    assert str(path) in str(info.value) and "train.learning_rate: unknown key" in str(info.value)


def test_wrong_type_names_the_key_and_the_value(recipe_file):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file(train__micro_batch_size="two"), SFTRecipe)
    assert "train.micro_batch_size" in str(info.value) and "'two'" in str(info.value)


def test_missing_file_names_the_key(recipe_file, tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file(data__train=str(tmp_path / "nope.jsonl")), SFTRecipe)
    assert "data.train: file not found" in str(info.value) and "nope.jsonl" in str(info.value)


def test_inconsistent_values_are_refused(recipe_file):
    with pytest.raises(RecipeError, match="min_lr"):
        load_recipe(recipe_file(train__lr=1e-6, train__min_lr=1e-5), SFTRecipe)
    with pytest.raises(RecipeError, match="exactly one of `path` and `from_config`"):
        load_recipe(recipe_file(model__path="some/model"), SFTRecipe)


def test_grpo_loss_keys_are_checked_against_the_loss_config(tmp_path, repo_root):
    path = tmp_path / "grpo.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(repo_root / "data/tokenizer")},
                "data": {"train": str(repo_root / "data/arith/rl.jsonl")},
                "rewards": {"functions": [{"name": "math_accuracy"}]},
                "grpo": {"loss": {"betta": 0.1}},
                "output_dir": str(tmp_path / "o"),
            }
        )
    )
    with pytest.raises(RecipeError, match=r"unknown grpo.loss keys \['betta'\]"):
        load_recipe(path, GRPORecipe)


def test_cli_reports_recipe_errors_without_a_traceback(recipe_file):
    path = recipe_file(train__lr="fast")
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "sft", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "train.lr" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command", [[], ["sft"], ["grpo"], ["traces"], ["distill"], ["eval-rewards"], ["quickstart"]]
)
def test_help_describes_each_command(command):
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *command, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage: posttrain" in result.stdout
    assert len(result.stdout) > 300
