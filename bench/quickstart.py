"""The bundled main job, timed: `posttrain quickstart` (SFT of a tiny DeepSeek-V3, then GRPO) end to end, per seed.

    .venv/bin/python bench/quickstart.py                         # seed 0, torch's default thread count
    .venv/bin/python bench/quickstart.py --seeds 0 1             # one run after the other
    .venv/bin/python bench/quickstart.py --seeds 1 --threads 1   # 1 thread: a machine busy with other work

Each seed is one `posttrain quickstart --output-dir DIR/seed_S train.seed=S` in its own process, as a user runs it
(imports, data, both recipes, reports), so the wall time is the one a user waits. CPU time is user + sys of that
process and of the processes it waited for (the reward workers). On an idle machine a 2-thread run has
wall ≈ CPU / 2; a much larger wall means other work shared the cores.

Printed per seed: wall and CPU seconds, the SFT and GRPO phases' wall seconds, held-out accuracy after SFT and
after GRPO (pass@1 over eval.max_prompts × eval.samples sampled answers) with one standard error each, and the
gain; then one JSON line per seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, output_dir: Path, threads: int | None, overrides: list[str]) -> dict:
    """One `posttrain quickstart` run; its summary.json plus wall and CPU seconds."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [
        sys.executable, "-m", "posttrain", "quickstart", "--output-dir", str(output_dir),
        f"train.seed={seed}", "logging.progress=false", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(
            f"seed {seed}: `{' '.join(command)}` failed (exit {os.waitstatus_to_exitcode(status)})"
        )
    summary = json.loads((output_dir / "summary.json").read_text())
    answers = _sampled_answers(output_dir / "grpo" / "recipe.yaml")
    return {
        "seed": seed,
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        **{key: summary[key] for key in ("sft_wall_s", "grpo_wall_s")},
        "after_sft": summary["held_out_accuracy_after_sft"],
        "after_grpo": summary["held_out_accuracy_after_grpo"],
        "gain": round(summary["held_out_accuracy_after_grpo"] - summary["held_out_accuracy_after_sft"], 4),
        "sampled_answers": answers,
    }


def _sampled_answers(grpo_recipe: Path) -> int:
    """Answers behind each held-out accuracy, as the run resolved its recipe: prompts × samples."""
    recipe = yaml.safe_load(grpo_recipe.read_text())
    prompts = sum(1 for path in recipe["data"]["eval"] for _ in (ROOT / path).open())
    if recipe["eval"]["max_prompts"]:
        prompts = min(prompts, recipe["eval"]["max_prompts"])
    return prompts * (recipe["eval"]["samples"] if recipe["eval"]["temperature"] > 0 else 1)


def standard_error(accuracy: float, answers: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / answers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output-dir", default="runs/bench_quickstart")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS; default: torch's own")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both recipes")
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}"
    )
    rows = []
    for seed in args.seeds:
        out = Path(args.output_dir).resolve() / f"seed_{seed}"
        if out.exists():
            raise SystemExit(f"{out} exists: choose another --output-dir or remove it")
        rows.append(run_seed(seed, out, args.threads, args.overrides))
        r = rows[-1]
        print(
            f"seed {seed}: wall {r['wall_s']:.0f} s (SFT {r['sft_wall_s']:.0f} s, GRPO {r['grpo_wall_s']:.0f} s), "
            f"CPU {r['cpu_s']:.0f} s | held-out after SFT {r['after_sft']:.3f} "
            f"± {standard_error(r['after_sft'], r['sampled_answers']):.3f}, after GRPO {r['after_grpo']:.3f} "
            f"± {standard_error(r['after_grpo'], r['sampled_answers']):.3f} ({r['sampled_answers']} answers "
            f"each), gain {r['gain']:+.3f}",
            flush=True,
        )
    print(f"load after: {os.getloadavg()}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
