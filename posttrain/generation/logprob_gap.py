"""Measure how far vLLM's per-token log-probs are from the trainer's (transformers) on tiny random models.

    python -m posttrain.generation.logprob_gap [--arch qwen2 deepseek_v3] [--max-tokens 32]

For each architecture: build the tiny checkpoint, start the colocated vLLM engine, generate greedily and by
sampling (T = 1, n = 4), score the same tokens with one fp32 transformers forward pass (the trainer), and
print for each engine dtype the mean and max absolute gap |logprob_vllm − logprob_transformers| (nats per token) and whether greedy tokens agree.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.generation.base import SamplingParams
from posttrain.generation.testing import (
    build_tiny_deepseek_v3,
    build_tiny_qwen2,
    forward_logprobs,
    transformers_greedy,
)
from posttrain.generation.vllm import VLLMBackend

BUILDERS = {"qwen2": build_tiny_qwen2, "deepseek_v3": build_tiny_deepseek_v3}
QUESTIONS = [
    "two plus three",
    "what is seven times eight",
    "sum of 12 and 30 then minus 4",
    "the cat and the dog",
]


ENGINE_DTYPES = ["float32", "bfloat16"]  # the trainer is always fp32 transformers


def measure(arch: str, dtype: str, max_tokens: int, workdir: Path) -> dict[str, float | str]:
    directory = workdir / arch
    if not directory.exists():
        BUILDERS[arch](directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = [
        list(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
                "input_ids"
            ]
        )
        for q in QUESTIONS
    ]
    engine = VLLMBackend(directory, dtype=dtype, max_model_len=256, enforce_eager=True)
    started = time.perf_counter()
    greedy = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    sampled = engine.generate(prompts, SamplingParams(n=4, max_tokens=max_tokens, temperature=1.0, seed=0))
    generate_s = time.perf_counter() - started
    engine.close()

    gaps = []
    for outputs in (greedy, sampled):
        for prompt, completions in zip(prompts, outputs, strict=True):
            for completion in completions:
                reference = forward_logprobs(model, prompt, completion.token_ids)
                gaps.append((torch.tensor(completion.logprobs, dtype=torch.float64) - reference).abs())
    gaps = torch.cat(gaps)
    greedy_agree = sum(
        completions[0].token_ids == transformers_greedy(model, prompt, max_tokens)
        for prompt, completions in zip(prompts, greedy, strict=True)
    )
    return {
        "arch": arch,
        "engine": dtype,
        "tokens": gaps.numel(),
        "mean_gap": gaps.mean().item(),
        "max_gap": gaps.max().item(),
        "greedy_agree": f"{greedy_agree}/{len(prompts)}",
        "generate_s": generate_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", nargs="+", choices=sorted(BUILDERS), default=["qwen2", "deepseek_v3"])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [
            measure(arch, dtype, args.max_tokens, Path(workdir))
            for arch in args.arch
            for dtype in ENGINE_DTYPES
        ]
    print(
        f"{'arch':<12} {'vllm dtype':<10} {'tokens':>7} {'mean |gap|':>11} {'max |gap|':>10} {'greedy agree':>13} {'gen s':>6}"
    )
    for row in rows:
        print(
            f"{row['arch']:<12} {row['engine']:<10} {row['tokens']:>7} {row['mean_gap']:>11.2e} {row['max_gap']:>10.2e} "
            f"{row['greedy_agree']:>13} {row['generate_s']:>6.2f}"
        )


if __name__ == "__main__":
    main()
