"""Trace pipeline overhead: everything `posttrain traces` does besides generating — reward scoring in worker
processes, the readability filters, building both SFT formats, durable (fsync'ed) ledger commits, the report.

    .venv/bin/python bench/traces.py                       # 512 arithmetic prompts x 8 samples, 2 reward workers
    .venv/bin/python bench/traces.py --prompts 1000 --samples 16 --workers 4

The teacher is an instant stand-in that answers each prompt with a well-formed R1-style trace, right 80% of the
time, so the figures are the pipeline's own cost per sample (a real teacher's generation time adds to it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path, and bench/rewards.py would shadow `rewards`.
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]


class InstantTeacher:
    """Backend protocol; looks each prompt's reference answer up by its token ids."""

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], str]) -> None:
        self.tokenizer = tokenizer
        self.answers = answers

    def generate(self, prompt_ids, params):
        from posttrain.generation.base import Completion

        rng = random.Random(params.seed)
        out = []
        for ids in prompt_ids:
            group = []
            for _ in range(params.n):
                answer = int(self.answers[tuple(ids)]) + (rng.random() < 0.2)
                text = f"<think>\nfirst the sum, then the difference\n</think>\nThe answer is \\boxed{{{answer}}}."
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                group.append(Completion(tokens, text, [0.0] * len(tokens), "stop"))
            out.append(group)
        return out

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from posttrain.data.prompts import load_prompts
    from posttrain.policy import load_tokenizer
    from posttrain.traces import TracesRecipe, run_traces

    with tempfile.TemporaryDirectory() as tmp:
        recipe = TracesRecipe.model_validate(
            {
                "model": {
                    "from_config": str(ROOT / "recipes/models/tiny_qwen2.json"),
                    "tokenizer": str(ROOT / "data/tokenizer"),
                },
                "data": {"train": [str(ROOT / "data/arith/rl.jsonl")]},
                "rewards": {
                    "functions": [{"name": "math_accuracy"}],
                    "workers": args.workers,
                    "timeout_s": 30,
                },
                "accept": {"num_samples": args.samples, "max_per_prompt": 2, "pass_at_k": [1, args.samples]},
                "run": {"batch_prompts": args.batch, "max_prompts": args.prompts},
                "output_dir": str(Path(tmp) / "traces"),
            }
        )
        tokenizer = load_tokenizer(recipe.model)
        prompts = load_prompts(recipe.data.train, tokenizer)
        answers = {
            tuple(ids): a for ids, a in zip(prompts.prompt_ids, prompts.columns["answer"], strict=True)
        }
        teacher = InstantTeacher(tokenizer, answers)
        start = time.perf_counter()
        out = run_traces(recipe, backend=teacher)
        elapsed = time.perf_counter() - start
        start = time.perf_counter()
        run_traces(recipe, resume=True, backend=teacher)  # everything committed: ledger read + report only
        resume_s = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())

    samples = summary["samples"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; reward workers {args.workers}"
    )
    print(
        f"prompts {summary['prompts']}, samples {samples}, accepted {summary['accepted']} ({summary['acceptance_rate']:.1%})"
    )
    print(
        f"pipeline (scoring + filters + commits + report): {elapsed:.1f} s = {samples / elapsed:.0f} samples/s "
        f"= {1000 * elapsed / samples:.2f} ms per sample"
    )
    print(f"resume of a finished run (ledger replay + report): {resume_s:.2f} s")


if __name__ == "__main__":
    main()
