"""posttrain.samples: which completions a run shows, the JSONL it keeps them in, the report.md view, and the
warning when rewards stop telling completions apart. (A GRPO run writing them end to end:
test_trl_rewards.py::test_trl_style_rewards_in_a_posttrain_grpo_run.)"""

from __future__ import annotations

import json
import logging
import math

import pytest

from posttrain.samples import (
    GRPO_NO_SIGNAL,
    NoSignalAlarm,
    SampleLog,
    pick_samples,
    unverified_fraction,
    write_samples_view,
)

SYSTEM = {"role": "system", "content": "Answer in a box."}
PROMPTS = [[SYSTEM, {"role": "user", "content": f"question {g}"}] for g in range(3) for _ in range(3)]
COMPLETIONS = [f"completion {i}" for i in range(9)]
# group 0: a tie at the top; group 1: a sample without a total (it ranks lowest); group 2: all equal
TOTALS = [0.5, 1.0, 1.0, None, 0.0, 0.0, 2.0, 2.0, 2.0]
PER_FUNCTION = {
    "math_accuracy": [0.0, 1.0, 1.0, None, 0.0, 0.0, 1.0, 1.0, 1.0],
    "r1_format": [0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, math.nan],
}


def test_best_and_worst_of_the_first_groups_with_their_rewards_and_spread():
    picked = pick_samples(PROMPTS, COMPLETIONS, TOTALS, PER_FUNCTION, group_size=3, count=5)
    assert [(s["group"], s["pick"], s["completion"]) for s in picked] == [
        (0, "best", "completion 1"),  # 1.0 twice: the earlier one
        (0, "worst", "completion 0"),
        (1, "best", "completion 4"),  # 0.0 twice: the earlier one; None is below every number
        (1, "worst", "completion 3"),
        (2, "best", "completion 6"),
    ]
    assert picked[0] == {
        "group": 0,
        "pick": "best",
        "prompt": "question 0",
        "completion": "completion 1",
        "rewards": {"math_accuracy": 1.0, "r1_format": 0.0},
        "reward_total": 1.0,
        "group_rewards": [0.5, 1.0, 1.0],
        "group_reward_std": pytest.approx(math.sqrt(((0.5 - 2.5 / 3) ** 2 + 2 * (1 - 2.5 / 3) ** 2) / 3)),
    }
    assert picked[3]["reward_total"] is None and picked[3]["rewards"]["math_accuracy"] is None
    assert picked[3]["group_rewards"] == [None, 0.0, 0.0] and picked[3]["group_reward_std"] == 0.0
    # an all-equal group still shows two different completions: the first as best, the last as worst
    last = pick_samples(PROMPTS, COMPLETIONS, TOTALS, PER_FUNCTION, 3, count=6)[-1]
    assert (last["pick"], last["completion"], last["group_reward_std"]) == ("worst", "completion 8", 0.0)
    assert last["rewards"]["r1_format"] is None  # NaN scores are written as null, which JSON can hold
    assert pick_samples(PROMPTS, COMPLETIONS, TOTALS, PER_FUNCTION, 3, count=0) == []
    with pytest.raises(ValueError, match="9 completions do not split into groups of 2"):
        pick_samples(PROMPTS, COMPLETIONS, TOTALS, PER_FUNCTION, 2, 4)


def test_sample_log_appends_each_step_and_drops_steps_a_resumed_run_repeats(tmp_path):
    log = SampleLog(tmp_path, count=2, group_size=3, keep_through=0)
    for step in (1, 2, 3):
        log.write(step, PROMPTS, COMPLETIONS, TOTALS, PER_FUNCTION)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["step"], r["pick"]) for r in rows] == [(s, p) for s in (1, 2, 3) for p in ("best", "worst")]
    assert rows[0] == {"step": 1, **pick_samples(PROMPTS, COMPLETIONS, TOTALS, PER_FUNCTION, 3, 1)[0]}

    SampleLog(tmp_path, count=2, group_size=3, keep_through=2)  # resumed from the checkpoint of step 2
    assert (tmp_path / "samples.jsonl").read_text().splitlines() == lines[:4]
    SampleLog(tmp_path, count=2, group_size=3, keep_through=None)  # a trace run resumed: keeps everything
    assert (tmp_path / "samples.jsonl").read_text().splitlines() == lines[:4]
    SampleLog(tmp_path, count=2, group_size=3, keep_through=0)  # a fresh run in the same directory
    assert (tmp_path / "samples.jsonl").read_text() == ""

    off = SampleLog(tmp_path / "off", count=0, group_size=3, keep_through=0)
    assert off.write(1, PROMPTS, COMPLETIONS, TOTALS, PER_FUNCTION) == []
    assert not (tmp_path / "off" / "samples.jsonl").exists()


def test_trace_batch_rows_are_shown_like_grpo_groups(tmp_path):
    rows = [
        {
            "prompt_index": 7 + i // 3,
            "response": COMPLETIONS[i],
            "rewards": {name: values[i] for name, values in PER_FUNCTION.items()},
            "reward_total": TOTALS[i],
            "verified": TOTALS[i] is not None and TOTALS[i] >= 1.0,
        }
        for i in range(6)
    ]
    messages = {7: PROMPTS[0], 8: PROMPTS[3]}
    SampleLog(tmp_path, 4, 3, keep_through=0).write_trace_batch(5, rows, messages)
    written = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    expected = pick_samples(
        PROMPTS[:6], COMPLETIONS[:6], TOTALS[:6], {k: v[:6] for k, v in PER_FUNCTION.items()}, 3, 4
    )
    assert written == [{"step": 5, **sample} for sample in expected]
    assert unverified_fraction(rows) == 0.5  # prompt 7 has a verified sample, prompt 8 none


def _alarm_steps(fractions: list[float], caplog) -> list[int]:
    alarm = NoSignalAlarm(GRPO_NO_SIGNAL, threshold=0.9, patience=3)
    with caplog.at_level(logging.WARNING, logger="posttrain.samples"):
        fired = [step for step, fraction in enumerate(fractions, 1) if alarm.update(fraction)]
    assert len(caplog.records) == len(fired)
    return fired


def test_no_signal_warning_after_exactly_three_steps_at_90_percent_once_per_streak(caplog):
    assert _alarm_steps([0.9, 1.0, 0.95, 1.0, 1.0, 0.5, 0.9, 0.9, 0.9], caplog) == [3, 9]
    message = caplog.records[0].getMessage()
    assert "for 3 steps in a row (now 95%)" in message and "GRPO has no signal" in message
    assert "samples.jsonl" in message and "cold-start SFT" in message and "dynamic_sampling" in message


def test_no_warning_at_89_percent_or_when_a_streak_breaks(caplog):
    assert _alarm_steps([0.89] * 6, caplog) == []
    assert _alarm_steps([1.0, 1.0, 0.89, 1.0, 1.0, 0.0], caplog) == []


def test_report_view_shows_the_last_steps_best_first_verbatim(tmp_path):
    log = SampleLog(tmp_path, count=2, group_size=3, keep_through=0)
    tricky = [*COMPLETIONS[:1], "code:\n```python\nx = 1\n```\n", *COMPLETIONS[2:]]  # a fence inside
    for step in range(1, 6):
        log.write(step, PROMPTS, tricky, TOTALS, PER_FUNCTION)
    view = write_samples_view(tmp_path, "GRPO run", steps=3).read_text()
    assert [line for line in view.splitlines() if line.startswith("## ")] == [
        "## Step 5",
        "## Step 4",
        "## Step 3",
    ]
    assert "![metrics](report.png)" not in view  # no plot was written
    assert (
        "### Group 0, best: total 1\n\nGroup totals: 0.5, 1, 1 (std 0.236). Rewards: math_accuracy 1" in view
    )
    assert "````text\ncode:\n```python\nx = 1\n```\n\n````" in view  # the longer fence keeps it verbatim
    assert write_samples_view(tmp_path / "empty", "nothing") is None
