"""What the model writes: a few completions per step with their rewards, kept in `samples.jsonl` and shown in
`report.md`, and a loud warning when the rewards stop telling completions apart.

A GRPO step (or a trace batch) is made of groups: the completions of one prompt, consecutive. The samples
shown are chosen without randomness, so a run and its test see the same ones: the first groups of the step in
order, and from each its best completion (highest total reward, the earlier one on ties) then its worst
(lowest total, the later one on ties; a completion without a total ranks below every number).
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewards.registry import message_text

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
VIEW_FILE = "report.md"


def _number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def pick_samples(
    prompts: Sequence[str | list[dict]],
    completions: Sequence[str],
    totals: Sequence[float | None],
    per_function: dict[str, Sequence[float | None]],
    group_size: int,
    count: int,
) -> list[dict[str, Any]]:
    """`count` samples of a batch of consecutive groups of `group_size` completions (rule in the module
    docstring), each as a JSON-ready dict: the prompt's user text, the completion, every reward's score, the
    total, and its group's totals with their standard deviation (the spread GRPO learns from).

    `totals` and the per-function scores hold ``None`` (or NaN) where a sample has no score."""
    n = len(completions)
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} completions do not split into groups of {group_size}")
    picked: list[dict[str, Any]] = []
    for start in range(0, n, group_size):
        members = range(start, start + group_size)
        group = [_number(totals[i]) for i in members]
        rank = {
            i: (-math.inf if value is None else value, -i) for i, value in zip(members, group, strict=True)
        }
        best, worst = max(members, key=rank.__getitem__), min(members, key=rank.__getitem__)
        present = [value for value in group if value is not None]
        for pick, i in (("best", best), ("worst", worst)):
            if len(picked) == count or (pick == "worst" and worst == best):
                break
            picked.append(
                {
                    "group": start // group_size,
                    "pick": pick,
                    "prompt": message_text(prompts[i], role="user"),
                    "completion": completions[i],
                    "rewards": {name: _number(values[i]) for name, values in per_function.items()},
                    "reward_total": group[i - start],
                    "group_rewards": group,
                    "group_reward_std": statistics.pstdev(present) if present else None,
                }
            )
        if len(picked) == count:
            break
    return picked


class SampleLog:
    """`samples.jsonl` in `output_dir`: one JSON object per shown sample, with the step it comes from.

    Rows of steps after `keep_through` are dropped when the log opens (a resumed run writes those steps again;
    0: a fresh run); ``None`` keeps every row (trace runs append only committed batches)."""

    def __init__(self, output_dir: str | Path, count: int, group_size: int, keep_through: int | None) -> None:
        self.path = Path(output_dir) / SAMPLES_FILE
        self.count, self.group_size = count, group_size
        if keep_through is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= keep_through
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(
        self,
        step: int,
        prompts: Sequence[str | list[dict]],
        completions: Sequence[str],
        totals: Sequence[float | None],
        per_function: dict[str, Sequence[float | None]],
    ) -> list[dict[str, Any]]:
        """Pick this step's samples and append them; returns the rows written (none when the count is 0)."""
        if not self.count:
            return []
        picked = pick_samples(prompts, completions, totals, per_function, self.group_size, self.count)
        rows = [{"step": step, **sample} for sample in picked]
        with self.path.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        return rows

    def write_trace_batch(self, step: int, sample_rows: list[dict[str, Any]], messages: Sequence) -> None:
        """`write` from a trace batch's `samples` rows (prompt_index, response, rewards, reward_total)."""
        if not sample_rows:
            return
        self.write(
            step,
            [messages[row["prompt_index"]] for row in sample_rows],
            [row["response"] for row in sample_rows],
            [row["reward_total"] for row in sample_rows],
            {name: [row["rewards"][name] for row in sample_rows] for name in sample_rows[0]["rewards"]},
        )


class NoSignalAlarm:
    """Logs `message` as a warning once per streak of `patience` consecutive steps whose fraction of groups
    without signal is at least `threshold`; the streak ends at the first step below it.

    `message` may use {fraction}, {threshold} and {patience}."""

    def __init__(self, message: str, threshold: float = 0.9, patience: int = 3) -> None:
        self.message, self.threshold, self.patience = message, threshold, patience
        self.streak = 0

    def update(self, fraction: float) -> bool:
        """Count this step; True when this step completes a streak (and the warning was logged)."""
        self.streak = self.streak + 1 if fraction >= self.threshold else 0
        if self.streak != self.patience:
            return False
        log.warning(self.message.format(fraction=fraction, threshold=self.threshold, patience=self.patience))
        return True


GRPO_NO_SIGNAL = (
    "rewards are equal within {threshold:.0%} or more of the groups for {patience} steps in a row (now "
    "{fraction:.0%}): GRPO has no signal and the policy is not learning. The model may never produce what the "
    "rewards look for (e.g. the answer format): read samples.jsonl in the output directory; consider a "
    "cold-start SFT on well-formatted examples, grpo.dynamic_sampling=true, or a shaping reward such as "
    "r1_format or tag_count"
)
TRACES_NO_SIGNAL = (
    "no completion reached accept.threshold for {threshold:.0%} or more of the prompts for {patience} batches "
    "in a row (now {fraction:.0%}): rejection sampling keeps almost nothing. The teacher may never write what "
    "the rewards look for (e.g. the answer format): read samples.jsonl in the output directory; check "
    "data.system_prompt, the rewards' kwargs and generation.max_tokens"
)


def unverified_fraction(sample_rows: list[dict[str, Any]]) -> float:
    """The share of a trace batch's prompts none of whose samples is verified."""
    prompts = {row["prompt_index"] for row in sample_rows}
    verified = {row["prompt_index"] for row in sample_rows if row["verified"]}
    return 1 - len(verified) / len(prompts) if prompts else 0.0


def write_samples_view(
    output_dir: str | Path, title: str, steps: int = 3, max_chars: int = 2000
) -> Path | None:
    """`report.md`: the samples of the last `steps` steps of `samples.jsonl`, best and worst of each group,
    under the metrics plot when there is one. Text (not a PNG panel) because completions are long, need
    their line breaks, and are read, searched and copied; long ones are cut at `max_chars`."""
    out = Path(output_dir)
    path = out / SAMPLES_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    if not rows:
        return None
    last = sorted({row["step"] for row in rows})[-steps:]
    lines = [f"# {title}", ""]
    if (out / "report.png").exists():
        lines += ["![metrics](report.png)", ""]
    lines += [
        f"Best and worst completion of the first groups of the last {len(last)} steps "
        f"(every step: `{SAMPLES_FILE}`).",
        "",
    ]
    for step in reversed(last):
        lines += [f"## Step {step}", ""]
        for row in (r for r in rows if r["step"] == step):
            spread = ", ".join(_show(v) for v in row["group_rewards"])
            lines += [
                f"### Group {row['group']}, {row['pick']}: total {_show(row['reward_total'])}",
                "",
                f"Group totals: {spread} (std {_show(row['group_reward_std'])}). Rewards: "
                + ", ".join(f"{name} {_show(value)}" for name, value in row["rewards"].items()),
                "",
                "Prompt:",
                "",
                *_fenced(row["prompt"], max_chars),
                "Completion:",
                "",
                *_fenced(row["completion"], max_chars),
            ]
    view = out / VIEW_FILE
    view.write_text("\n".join(lines))
    return view


def _show(value: float | None) -> str:
    return "none" if value is None else f"{value:.3g}"


def _fenced(text: str, max_chars: int) -> list[str]:
    """A code block that shows `text` verbatim: its fence is longer than any run of backticks inside."""
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n… ({len(text) - max_chars} more characters)"
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return [f"{fence}text", text, fence, ""]
