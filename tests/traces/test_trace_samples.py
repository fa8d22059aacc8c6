"""A trace run shows what the teacher writes: the best and worst sample of its first prompts per batch in
samples.jsonl and report.md, and a warning when rejection sampling keeps (almost) nothing for 3 batches."""

from __future__ import annotations

import json
import logging

from scripted_teacher import ScriptedBackend, arithmetic_teacher
from transformers import AutoTokenizer

from posttrain.samples import pick_samples
from posttrain.traces import run_traces


def test_a_teacher_that_is_always_wrong_is_shown_and_warned_about(traces_recipe, repo_root, caplog):
    recipe = traces_recipe("wrong", max_prompts=16, logging={"samples": 3})  # 4 batches of 4 prompts
    tokenizer = AutoTokenizer.from_pretrained(repo_root / "data" / "tokenizer")
    with caplog.at_level(logging.WARNING, logger="posttrain.samples"):
        out = run_traces(recipe, backend=ScriptedBackend(tokenizer, arithmetic_teacher(wrong_rate=1.0)))

    (warning,) = [r.getMessage() for r in caplog.records if r.name == "posttrain.samples"]
    assert warning.startswith(
        "no completion reached accept.threshold for 90% or more of the prompts for 3 batches"
    )
    shown = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["group"], s["pick"]) for s in shown] == [
        (step, group, pick)
        for step in (1, 2, 3, 4)
        for group, pick in ((0, "best"), (0, "worst"), (1, "best"))
    ]
    samples = [
        json.loads(line) for part in sorted((out / "samples").glob("part-*.jsonl")) for line in part.open()
    ]
    first_batch = [s for s in samples if s["prompt_index"] < 4]
    expected = pick_samples(
        [[{"role": "user", "content": "?"}]] * len(first_batch),
        [s["response"] for s in first_batch],
        [s["reward_total"] for s in first_batch],
        {"math_accuracy": [s["rewards"]["math_accuracy"] for s in first_batch]},
        group_size=4,
        count=3,
    )
    assert [{k: v for k, v in s.items() if k not in ("step", "prompt")} for s in shown[:3]] == [
        {k: v for k, v in s.items() if k != "prompt"} for s in expected
    ]
    assert all(s["rewards"] == {"math_accuracy": 0.0} for s in shown)
    with open(recipe.data.train[0]) as handle:
        assert (
            shown[0]["prompt"] == json.loads(handle.readline())["prompt"][-1]["content"]
        )  # prompt 0's question
    assert "## Step 4" in (out / "report.md").read_text()
