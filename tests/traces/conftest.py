"""Trace-run fixtures: a recipe builder over the bundled arithmetic prompts and the scripted teacher."""

from __future__ import annotations

import pytest

from posttrain.traces.config import TracesRecipe


@pytest.fixture
def traces_recipe(tmp_path, repo_root):
    """traces_recipe(name, **sections) -> TracesRecipe over the first `max_prompts` arithmetic RL prompts."""

    def build(name: str = "traces", max_prompts: int = 12, **sections) -> TracesRecipe:
        raw = {
            "model": {
                "from_config": str(repo_root / "recipes/models/tiny_qwen2.json"),
                "tokenizer": str(repo_root / "data/tokenizer"),
            },
            "teacher_name": "scripted-arithmetic",
            "data": {"train": [str(repo_root / "data/arith/rl.jsonl")]},
            "generation": {"max_tokens": 64, "temperature": 1.0},
            "rewards": {"functions": [{"name": "math_accuracy"}], "workers": 1, "timeout_s": 120},
            "accept": {"num_samples": 4, "max_per_prompt": 4, "pass_at_k": [1, 2, 4]},
            "output": {"shard_rows": 10},
            "run": {"batch_prompts": 4, "max_prompts": max_prompts, "backoff_s": 0.0},
            "output_dir": str(tmp_path / name),
        }
        for key, value in sections.items():
            raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
        return TracesRecipe.model_validate(raw)

    return build
