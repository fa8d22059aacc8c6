"""Traces to student on the bundled arithmetic task: a scripted teacher that is wrong 20% of the time, rejection
sampling that keeps only verified traces, and a tiny Qwen2 student whose held-out reward rises after SFT on them."""

from __future__ import annotations

import json

import pytest
from scripted_teacher import ScriptedBackend, arithmetic_teacher, solve
from transformers import AutoTokenizer

from posttrain.traces import accepted_files, run_traces
from posttrain.trainers.distill import DistillRecipe, train_distill


@pytest.mark.slow
def test_student_learns_from_verified_traces_of_a_teacher_that_is_often_wrong(
    tmp_path, repo_root, traces_recipe
):
    traces = traces_recipe(
        "traces",
        max_prompts=320,
        accept={"num_samples": 4, "max_per_prompt": 1, "pass_at_k": [1, 4]},
        output={"r1_system_prompt": None, "shard_rows": 64},  # keep the task's own system prompt
        run={"batch_prompts": 80},
    )
    tokenizer = AutoTokenizer.from_pretrained(traces.model.tokenizer)
    out = run_traces(traces, backend=ScriptedBackend(tokenizer, arithmetic_teacher(wrong_rate=0.2)))
    summary = json.loads((out / "summary.json").read_text())
    assert (
        0.7 < summary["verified"] / summary["samples"] < 0.9
    )  # the teacher's 80%, verified by math_accuracy
    rows = [json.loads(line) for path in accepted_files(out) for line in open(path)]
    assert len(rows) == summary["accepted"] > 300
    assert all(
        row["messages"][-1]["content"].endswith(f"{{{solve(row['messages'][1]['content']).answer}}}.")
        for row in rows
    )

    recipe = DistillRecipe.model_validate(
        {
            "model": {
                "from_config": str(repo_root / "recipes/models/tiny_qwen2.json"),
                "tokenizer": str(repo_root / "data/tokenizer"),
                "mtp": {"attach_depth": 0},
            },
            "data": {"train": [str(out)], "max_seq_len": 256},
            "packing": {"capacity": 1024},
            "train": {"max_steps": 50, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 4},
            "generation": {"max_tokens": 48, "temperature": 0.0, "stop": ["<|im_end|>"]},
            "rewards": {
                "functions": [{"name": "math_accuracy"}, {"name": "r1_format", "weight": 0.5}],
                "workers": 1,
                "timeout_s": 120,
            },
            "eval": {"prompts": [str(repo_root / "data/arith/test.jsonl")], "max_prompts": 32},
            "logging": {"tensorboard": False, "progress": False},
            "output_dir": str(tmp_path / "student"),
        }
    )
    train_distill(recipe)
    result = json.loads((tmp_path / "student" / "eval.json").read_text())
    before, after = result["before"], result["after"]
    # A random student scores 0; after ~6 epochs on 320 traces it writes R1-formatted answers (r1_format,
    # weight 0.5) though rarely the right number yet: measured 0.0 -> 0.52 (accuracy 0 -> 0.03).
    assert after["eval/reward"] > before["eval/reward"] + 0.25, result
