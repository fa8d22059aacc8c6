"""Math reward benchmark: `rewards.math_accuracy` through the worker pool against calling math-verify directly.

    .venv/bin/python bench/rewards.py                 # the table, 4 copies for throughput, 2 workers
    .venv/bin/python bench/rewards.py --repeat 8 --workers 4

Pairs: the hand-labelled table of tests/rewards/math_cases.py (numbers, fractions, ..., hedged answers, and
pathological inputs such as `10^{10^{10^{10}}}` and `\\prod_{n=1}^{10^7} n`), the same for both sides.

- math-verify, called as its README shows: `verify(parse(reference), parse(completion))` with its default
  (signal-based, main-thread-only) 5 s timeouts; a reference that is not LaTeX-delimited is wrapped in `$...$`,
  which math-verify needs to read it.
- ours: `math_accuracy` (each check alone), and `RewardRunner([math_accuracy], workers, timeout_s=1)` on whole
  batches (throughput), in warm forkserver workers killed at the deadline.

Reported: accuracy against the hand labels; per-check latency (each check timed alone, end to end: for ours
including the pipe round trip and, for a killed check, the kill and the replacement worker) as p50 / p99 / max;
throughput in checks/s on the whole table and on its non-pathological pairs (fresh workers: no cached verdicts),
and on `--repeat` copies of the table in one batch (repeated answers, as in GRPO groups, hit the verdict cache).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and this file would shadow the `rewards` package.
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]


def load_cases() -> list:
    spec = importlib.util.spec_from_file_location("math_cases", ROOT / "tests" / "rewards" / "math_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CASES


def math_verify_check(completion: str, reference: str) -> bool:
    from math_verify import parse, verify

    delimited = any(mark in reference for mark in ("\\boxed", "####", "$"))
    return verify(parse(reference if delimited else f"${reference}$"), parse(completion))


def ours_check(completion: str, reference: str) -> bool:
    from rewards import math_accuracy

    return math_accuracy([""], [completion], [reference])[0] == 1.0


def timed_run(check, cases) -> tuple[list[bool], np.ndarray]:
    verdicts, seconds = [], []
    for case in cases:
        started = time.perf_counter()
        verdicts.append(check(case.completion, case.reference))
        seconds.append(time.perf_counter() - started)
    return verdicts, np.array(seconds)


def summary(name: str, cases, verdicts, seconds) -> dict:
    right = sum(v == c.expected for v, c in zip(verdicts, cases, strict=True))
    wrong = [
        f"{c.category}: {c.completion[-40:]!r} vs {c.reference!r}"
        for v, c in zip(verdicts, cases, strict=True)
        if v != c.expected
    ]
    print(
        f"{name:12s} accuracy {right}/{len(cases)} ({100 * right / len(cases):.1f}%)  latency p50 "
        f"{1e3 * np.percentile(seconds, 50):.1f} ms  p99 {1e3 * np.percentile(seconds, 99):.0f} ms  "
        f"max {1e3 * seconds.max():.0f} ms  sequential {len(cases) / seconds.sum():.1f} checks/s"
    )
    for line in wrong:
        print(f"{'':14s}wrong: {line}")
    return {"right": right, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=4, help="copies of the table in the throughput batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1.0, help="per-check deadline of the pool, seconds")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # math-verify logs every timeout

    cases = load_cases()
    pathological = [c.category == "pathological" for c in cases]
    cpus = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {cpus} CPUs, load average {load:.1f} at start"
    )
    print(
        f"pairs: {len(cases)} ({sum(pathological)} pathological); pool: {args.workers} workers, {args.timeout} s deadline\n"
    )

    math_verify_check("$1$", "1")  # imports and first-call set-up out of the timings
    ours_check("\\boxed{1}", "1")
    print("-- each check alone (accuracy, latency)")
    theirs = summary("math-verify", cases, *timed_run(math_verify_check, cases))
    ours = summary("ours (pool)", cases, *timed_run(ours_check, cases))

    print("\n-- throughput (checks/s)")
    normal = [c for c, bad in zip(cases, pathological, strict=True) if not bad]
    normal_seconds = theirs["seconds"][~np.array(pathological)]
    print(
        f"{'math-verify':12s} all pairs {len(cases) / theirs['seconds'].sum():6.1f}   without the pathological "
        f"ones {len(normal) / normal_seconds.sum():6.1f}   (one process: its signal timeouts need the main thread)"
    )
    ours_all, ours_normal, ours_repeated, killed = throughput(cases, normal, args)
    print(
        f"{'ours (pool)':12s} all pairs {ours_all:6.1f}   without the pathological ones {ours_normal:6.1f}   "
        f"({args.workers} fresh workers each, so no cached verdicts; checks killed at the deadline: {killed})"
    )
    print(
        f"{'':12s} {args.repeat} x the table in one batch {ours_repeated:6.1f}   (repeated answers hit the "
        "verdict cache, as the completions of a GRPO group do)"
    )
    all_rewards, math_only, math_verify_seconds = grpo_step(args)
    print(
        f"\n-- a GRPO step: 64 prompts x 8 completions (~1.5k characters), numeric answers, warm workers\n"
        f"{'math-verify':12s} {512 / math_verify_seconds:8.0f} checks/s ({1e3 * math_verify_seconds:.0f} ms)\n"
        f"{'ours (pool)':12s} {512 / math_only:8.0f} checks/s ({1e3 * math_only:.0f} ms); with r1_format and "
        f"tag_count as well: {1e3 * all_rewards:.0f} ms for 1536 reward calls"
    )
    speedup = ours_all / (len(cases) / theirs["seconds"].sum())
    print(
        f"\nspeed-up on all pairs: {speedup:.1f}x; accuracy {ours['right']} vs {theirs['right']} of {len(cases)}; "
        f"p99 latency {1e3 * np.percentile(ours['seconds'], 99):.0f} ms vs "
        f"{1e3 * np.percentile(theirs['seconds'], 99):.0f} ms"
    )


def grpo_batch(seed: int) -> tuple[list[str], list[str], list[str]]:
    """64 multiplication prompts x 8 completions of ~1.5k characters; half the answers are right, and the
    wrong ones repeat within a group as a policy's do."""
    import random

    rng = random.Random(seed)
    prompts, completions, answers = [], [], []
    for p in range(64):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        for _ in range(8):
            guess = a * b if rng.random() < 0.5 else a * b + rng.randint(1, 3)
            thinking = " ".join(f"{a} times {rng.randint(1, 9)} is part of it." for _ in range(40))
            prompts.append(f"What is {a} * {b}? (#{p})")
            completions.append(f"<think>{thinking}</think> So the product is $\\boxed{{{guess}}}$.")
            answers.append(str(a * b))
    return prompts, completions, answers


def grpo_step(args) -> tuple[float, float, float]:
    """On a fresh GRPO-like batch (warm workers, warmed on another batch): seconds for math_accuracy +
    r1_format + tag_count, seconds for math_accuracy alone, and seconds for math-verify on the same checks."""
    from rewards import RewardRunner, RewardSpec

    timings = []
    for specs in (
        [RewardSpec("math_accuracy"), RewardSpec("r1_format", 0.2), RewardSpec("tag_count", 0.1)],
        [RewardSpec("math_accuracy")],
    ):
        with RewardRunner(specs, workers=args.workers, timeout_s=args.timeout) as runner:
            for seed in (0, 1 + len(timings)):  # the first batch only warms the workers up
                prompts, completions, answers = grpo_batch(seed)
                started = time.perf_counter()
                runner.score(prompts, completions, {"answer": answers})
                seconds = time.perf_counter() - started
        timings.append(seconds)
    prompts, completions, answers = grpo_batch(3)
    started = time.perf_counter()
    for completion, answer in zip(completions, answers, strict=True):
        math_verify_check(completion, answer)
    timings.append(time.perf_counter() - started)
    return tuple(timings)


def throughput(cases, normal, args) -> tuple[float, float, float, int]:
    """checks/s of RewardRunner batches: all pairs and the non-pathological ones, each on fresh workers (no
    cached verdicts), then ``args.repeat`` copies of the table on the warm workers."""
    from rewards import RewardRunner, RewardSpec

    def rate(runner, subset) -> tuple[float, int]:
        columns = {"answer": [c.reference for c in subset]}
        started = time.perf_counter()
        scores = runner.score([""] * len(subset), [c.completion for c in subset], columns)
        return len(subset) / (time.perf_counter() - started), scores.timeout_counts["math_accuracy"]

    spec = RewardSpec("math_accuracy")
    with RewardRunner([spec], workers=args.workers, timeout_s=args.timeout) as runner:
        normal_rate, _ = rate(runner, normal)
    with RewardRunner([spec], workers=args.workers, timeout_s=args.timeout) as runner:
        all_rate, killed = rate(runner, cases)
        repeated_rate, _ = rate(runner, cases * args.repeat)
    return all_rate, normal_rate, repeated_rate, killed


if __name__ == "__main__":
    main()
