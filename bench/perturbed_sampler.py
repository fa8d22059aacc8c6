"""Does the sampler/trainer gap hurt GRPO, and do the corrections repair it? (issue 10, item 4)

    .venv/bin/posttrain sft recipes/sft_quickstart.yaml output_dir=runs/perturb/sft \
        model.from_config=recipes/models/tiny_qwen2.json model.implementation=auto model.mtp.attach_depth=1
    .venv/bin/python bench/perturbed_sampler.py --sft-model runs/perturb/sft/model --out runs/perturb

Every arm is the quickstart's GRPO recipe (recipes/grpo_quickstart.yaml) from the same SFT model, seed and
prompts; only the sampler and the loss's correction differ. BENCHMARKS.md's figures used the tiny Qwen2 above
(the quickstart's model before it became a tiny DeepSeek-V3); any SFT model works:

    clean          the sampler is the policy (the transformers backend on the trainer's own module)
    perturbed      rollouts from a perturbed policy q (`generation.sampler_perturbation`), no correction:
                   the loss treats q's tokens as if π_old had drawn them (tis_cap: null)
    perturbed_tis  the same rollouts, token-level truncated importance sampling min(π_old/q, 2) (the default)
    perturbed_mask the same rollouts, sequences whose mean |log q − log π_old| exceeds a threshold are dropped

Evaluation always samples the clean policy (pass@1 over 4 samples at T = 1 on 200 held-out problems), so the
arms are compared on what the trainer produced, not on what the perturbed sampler would do. Arms run as
subprocesses, `--parallel` at a time with `--threads` torch threads each. Writes `<out>/perturbed_sampler.json`, a
comparison plot `<out>/perturbed_sampler.png`, and each arm's own report (`<out>/<arm>/report.png`, with the gap
and importance-weight panels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PERTURBATIONS = {
    "temperature": "generation.sampler_perturbation.temperature_factor={value}",
    "weight_noise": "generation.sampler_perturbation.weight_noise={value}",
    "logit_bias": "generation.sampler_perturbation.logit_bias_std={value}",
}


def arms(kind: str, value: float, mask_threshold: float) -> dict[str, list[str]]:
    perturb = PERTURBATIONS[kind].format(value=value)
    return {
        "clean": [],
        "perturbed": [perturb, "grpo.loss.tis_cap=null"],
        "perturbed_tis": [perturb],
        "perturbed_mask": [
            perturb,
            "grpo.loss.tis_cap=null",
            f"grpo.loss.off_policy_mask_threshold={mask_threshold}",
            "grpo.loss.off_policy_mask_statistic=mean_abs_gap",
        ],
    }


def launch(name: str, overrides: list[str], args: argparse.Namespace) -> subprocess.Popen:
    out = Path(args.out) / name
    command = [
        sys.executable,
        "-m",
        "posttrain.cli",
        "grpo",
        str(ROOT / "recipes/grpo_quickstart.yaml"),
        f"model.path={args.sft_model}",
        f"output_dir={out}",
        f"train.max_steps={args.steps}",
        f"train.seed={args.seed}",
        "logging.progress=false",
        *overrides,
        *args.set,
    ]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    log = open(out / "stdout.log", "w")  # noqa: SIM115 (closed when the process is reaped)
    print(f"start {name}: {' '.join(overrides) or '(no overrides)'}", flush=True)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def summarise(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}

    def mean(key: str, last: int | None = None) -> float | None:
        values = [r[key] for r in steps[-last if last else 0 :] if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    return {
        "accuracy": evals,
        "accuracy_gain": evals[max(evals)] - evals[0],
        "gap_mean_abs": mean("gap/mean_abs"),
        "gap_seq_kl_k3": mean("gap/seq_kl_k3"),
        "tis_weight_mean": mean("tis/weight_mean"),
        "off_policy_masked_frac": mean("off_policy/masked_frac"),
        "reward_last10": mean("reward/math_accuracy", 10),
        "entropy_last10": mean("entropy", 10),
        "history": {
            key: [(r["step"], r[key]) for r in steps if key in r]
            for key in ("reward/math_accuracy", "gap/mean_abs", "entropy", "completion_length/mean")
        },
    }


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("held-out accuracy (clean policy)", None),
        ("reward/math_accuracy", "reward/math_accuracy"),
        ("gap/mean_abs", "gap/mean_abs"),
        ("entropy", "entropy"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4))
    for ax, (panel_title, key) in zip(axes, panels, strict=True):
        for name, result in results.items():
            points = sorted(result["accuracy"].items()) if key is None else result["history"][key]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=name, marker="o" if key is None else None)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sft-model", default="runs/quickstart/sft/model")
    parser.add_argument("--out", default="runs/perturbed_sampler")
    parser.add_argument("--perturbation", choices=sorted(PERTURBATIONS), default="temperature")
    parser.add_argument(
        "--value", type=float, default=1.5, help="temperature factor, noise σ or logit-bias σ_b"
    )
    parser.add_argument("--mask-threshold", type=float, default=0.1, help="mean |gap| per sequence, nats")
    parser.add_argument("--arms", nargs="*", help="run only these arms")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="arms at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument(
        "--set", nargs="*", default=[], help="extra recipe overrides for every arm, KEY=VALUE"
    )
    args = parser.parse_args()
    if not (Path(args.sft_model) / "config.json").exists():
        raise SystemExit(f"--sft-model {args.sft_model}: no model there; run the SFT quickstart first")

    plan = arms(args.perturbation, args.value, args.mask_threshold)
    plan = {name: plan[name] for name in (args.arms or plan)}
    pending, running, failed = list(plan.items()), {}, []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            name, overrides = pending.pop(0)
            running[name] = launch(name, overrides, args)
        time.sleep(5)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                print(f"done {name} (exit {process.returncode}) at {time.time() - t0:.0f} s", flush=True)
                if process.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"arms failed: {failed}; see {args.out}/<arm>/stdout.log")

    out = Path(args.out)
    results = {name: summarise(out / name) for name in plan}
    setting = f"{args.perturbation}={args.value}"
    (out / "perturbed_sampler.json").write_text(
        json.dumps({"perturbation": setting, "steps": args.steps, "arms": results}, indent=1)
    )
    plot(results, out / "perturbed_sampler.png", f"GRPO quickstart with a perturbed sampler ({setting})")
    eval_steps = sorted(next(iter(results.values()))["accuracy"])
    print(
        f"\n| arm | accuracy {' / '.join(f'step {s}' for s in eval_steps)} "
        "| gain | mean abs gap | TIS weight | masked | reward (last 10) |"
    )
    for name, r in results.items():
        acc = " / ".join(f"{r['accuracy'][s]:.3f}" for s in sorted(r["accuracy"]))
        cells = [r["gap_mean_abs"], r["tis_weight_mean"], r["off_policy_masked_frac"], r["reward_last10"]]
        text = " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
        print(f"| {name} | {acc} | {r['accuracy_gain']:+.3f} | {text} |")


if __name__ == "__main__":
    main()
