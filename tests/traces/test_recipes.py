"""The bundled trace and distillation recipes are valid (schema only: their inputs are produced by earlier runs)."""

from __future__ import annotations

import pytest
import yaml

from posttrain.traces import TracesRecipe
from posttrain.trainers.distill import DistillRecipe


@pytest.mark.parametrize(
    ("name", "schema"),
    [
        ("traces_arith.yaml", TracesRecipe),
        ("traces_openai.yaml", TracesRecipe),
        ("distill_arith.yaml", DistillRecipe),
        ("distill_kd_arith.yaml", DistillRecipe),
    ],
)
def test_bundled_recipe_validates(repo_root, name, schema):
    schema.model_validate(yaml.safe_load((repo_root / "recipes" / name).read_text()))


def test_pass_at_k_beyond_the_sample_count_is_refused(repo_root):
    raw = yaml.safe_load((repo_root / "recipes" / "traces_arith.yaml").read_text())
    raw["accept"]["pass_at_k"] = [1, 16]
    with pytest.raises(ValueError, match=r"pass_at_k \[16\] must lie in 1..accept.num_samples \(4\)"):
        TracesRecipe.model_validate(raw)
