"""The bundled main job: SFT a tiny model on generated arithmetic traces, then GRPO it with the sympy math
reward and the R1 format reward, and show held-out accuracy before and after GRPO.

Everything comes from two recipes (recipes/sft_quickstart.yaml, recipes/grpo_quickstart.yaml), so the same
pipeline runs step by step with `posttrain sft` and `posttrain grpo`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from posttrain.config import GRPORecipe, SFTRecipe, load_recipe
from posttrain.metrics import read_metrics


def held_out_accuracy(grpo_dir: Path) -> tuple[float, float]:
    """(accuracy before GRPO, after GRPO) from the GRPO run's evaluation rows."""
    evals = [row for row in read_metrics(grpo_dir / "metrics.jsonl") if "eval/accuracy" in row]
    if len(evals) < 2:
        raise RuntimeError(f"{grpo_dir}: expected evaluations before and after GRPO, found {len(evals)}")
    return evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(SFT overrides, GRPO overrides): a key of a section that only one of the recipes has goes to that recipe
    alone (`packing.capacity=256` to SFT, `grpo.prompts_per_step=4` or `eval.samples=2` to GRPO); every other key
    (`train.seed=1`, `train.max_steps=5`, sections neither has) goes to both."""
    sft_sections, grpo_sections = set(SFTRecipe.model_fields), set(GRPORecipe.model_fields)
    sft, grpo = [], []
    for item in overrides:
        section = item.split("=", 1)[0].split(".", 1)[0]
        if section not in grpo_sections or section in sft_sections:
            sft.append(item)
        if section not in sft_sections or section in grpo_sections:
            grpo.append(item)
    return sft, grpo


def run_quickstart(
    output_dir: str = "runs/quickstart", recipes_dir: str = "recipes", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run SFT then GRPO with `overrides` (`split_overrides`: `train.seed=1` applies to both recipes,
    `grpo.prompts_per_step=8` to GRPO only)."""
    from posttrain.trainers.grpo import train_grpo
    from posttrain.trainers.sft import train_sft

    out = Path(output_dir)
    sft_extra, grpo_extra = split_overrides(list(overrides or []))
    sft = load_recipe(
        Path(recipes_dir) / "sft_quickstart.yaml", SFTRecipe, [f"output_dir={out / 'sft'}", *sft_extra]
    )
    start = time.perf_counter()
    sft_model = train_sft(sft)
    sft_done = time.perf_counter()
    grpo = load_recipe(
        Path(recipes_dir) / "grpo_quickstart.yaml",
        GRPORecipe,
        [f"model.path={sft_model}", f"output_dir={out / 'grpo'}", *grpo_extra],
    )
    grpo_model = train_grpo(grpo)
    before, after = held_out_accuracy(out / "grpo")
    summary = {
        "held_out_accuracy_after_sft": before,
        "held_out_accuracy_after_grpo": after,
        "sft_model": str(sft_model),
        "grpo_model": str(grpo_model),
        "reports": [str(out / "sft" / "report.png"), str(out / "grpo" / "report.png")],
        "sft_wall_s": round(sft_done - start, 1),
        "grpo_wall_s": round(time.perf_counter() - sft_done, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
