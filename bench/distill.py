"""Distillation that transfers skill: the recipe chain quickstart SFT -> traces -> distill (SFT on the traces, and
logit KD), with the held-out accuracy of the teacher and of each student before and after, and each phase's wall
and CPU time.

    .venv/bin/python bench/distill.py                                  # trains the teacher (the quickstart's SFT)
    .venv/bin/python bench/distill.py --teacher runs/quickstart/sft/model
    .venv/bin/python bench/distill.py --traces key=value ... --distill key=value ...   # recipe overrides

Every phase runs the bundled recipe through the `posttrain` CLI (recipes/sft_quickstart.yaml,
recipes/traces_arith.yaml, recipes/distill_arith.yaml, recipes/distill_kd_arith.yaml) with the paths overridden
and nothing else changed: the traces recipe keeps one verified trace for each of 5000 distinct problems (the 4000
of data/arith/sft_prompts.jsonl and the 1000 of data/arith/rl.jsonl). Samples of one prompt are near copies of
each other (the trace format is fixed), so distinct problems are what teaches the student the skill.
Accuracy is greedy pass@1 with math_accuracy on all 200 prompts of data/arith/test.jsonl, for the teacher as for
the students. CPU time is user + sys of the phase's processes (on a machine shared with other work it says more
than wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path, and bench/rewards.py would shadow `rewards`.
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

HELD_OUT = ["eval.prompts=[data/arith/test.jsonl]", "eval.max_prompts=200"]
# a timed-out reward call scores 0: the recipe's 5 s bound is tight for a worker starting on a loaded machine
PATIENT_REWARDS = ["rewards.timeout_s=120"]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_phase(name: str, args: list[str], timings: dict[str, dict[str, float]]) -> None:
    """`posttrain ARGS` in a child process; records its wall and CPU seconds under `name`."""
    quiet = [] if args[0] == "traces" else ["logging.progress=false"]
    command = [sys.executable, "-m", "posttrain.cli", *args, *quiet]
    print("$ posttrain " + " ".join(args), flush=True)
    cpu, start = children_cpu_s(), time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    timings[name] = {"wall_s": time.perf_counter() - start, "cpu_s": children_cpu_s() - cpu}


def teacher_accuracy(teacher: Path, traces: Path) -> dict[str, float]:
    """The teacher scored exactly as the students are: distill_arith.yaml's generation, rewards and eval."""
    from posttrain.config import load_recipe
    from posttrain.policy import load_tokenizer
    from posttrain.trainers.distill import DistillRecipe, evaluate_student

    overrides = [
        f"model.path={teacher}",
        "model.from_config=null",
        f"data.train={traces}",
        *HELD_OUT,
        *PATIENT_REWARDS,
    ]
    recipe = load_recipe(ROOT / "recipes/distill_arith.yaml", DistillRecipe, overrides)
    return evaluate_student(str(teacher), load_tokenizer(recipe.model), recipe)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/bench_distill", help="run directory (replaced)")
    parser.add_argument("--teacher", help="an SFT model; default: train it with recipes/sft_quickstart.yaml")
    parser.add_argument("--traces", nargs="*", default=[], help="overrides of recipes/traces_arith.yaml")
    parser.add_argument("--distill", nargs="*", default=[], help="overrides of both distill recipes")
    parser.add_argument("--skip-kd", action="store_true", help="only the SFT-on-traces student")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    timings: dict[str, dict[str, float]] = {}

    teacher = Path(args.teacher).resolve() if args.teacher else out / "teacher" / "model"
    if not args.teacher:
        run_phase(
            "teacher_sft", ["sft", "recipes/sft_quickstart.yaml", f"output_dir={teacher.parent}"], timings
        )
    traces = out / "traces"
    run_phase(
        "traces",
        [
            "traces",
            "recipes/traces_arith.yaml",
            f"model.path={teacher}",
            f"output_dir={traces}",
            *PATIENT_REWARDS,
            *args.traces,
        ],
        timings,
    )
    students = {"distill_sft": "recipes/distill_arith.yaml"}
    if not args.skip_kd:
        students["distill_kd"] = "recipes/distill_kd_arith.yaml"
    for name, recipe in students.items():
        teacher_override = [f"kd.teacher.path={teacher}"] if name == "distill_kd" else []
        run_phase(
            name,
            [
                "distill",
                recipe,
                f"data.train={traces}",
                f"output_dir={out / name}",
                *teacher_override,
                *HELD_OUT,
                *PATIENT_REWARDS,
                *args.distill,
            ],
            timings,
        )

    summary = json.loads((traces / "summary.json").read_text())
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch_threads()}",
        "teacher": str(teacher),
        "teacher_accuracy": teacher_accuracy(teacher, traces)["eval/accuracy"],
        "traces": {k: summary[k] for k in ("prompts", "samples", "verified", "accepted") if k in summary},
        "students": {name: json.loads((out / name / "eval.json").read_text()) for name in students},
        "timings": timings,
    }
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"\nmachine: {results['machine']}")
    print(f"teacher {teacher}: held-out accuracy {results['teacher_accuracy']:.3f} (greedy, 200 prompts)")
    print(f"traces: {results['traces']}")
    for name, result in results["students"].items():
        before, after = result["before"]["eval/accuracy"], result["after"]["eval/accuracy"]
        ratio = after / results["teacher_accuracy"] if results["teacher_accuracy"] else float("nan")
        print(f"{name}: held-out accuracy {before:.3f} -> {after:.3f} ({ratio:.2f} x the teacher's)")
    for name, timing in timings.items():
        print(f"{name}: wall {timing['wall_s']:.0f} s, CPU (user+sys) {timing['cpu_s']:.0f} s")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
