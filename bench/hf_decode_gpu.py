"""posttrain's hf rollout backend, growing-mask decoding against static decoding replayed as a CUDA graph, and
transformers' `generate` (the rollout path of TRL's GRPOTrainer without vLLM), on a real chat model.

Prompts are the first --prompts rows of a prompt file in the model's chat template. Each way decodes them
--repeats times (the first call warms up and is not timed): sampled, --n completions per prompt at T = 1 up to
--max-tokens, reporting the median seconds per call and generated tokens per second; then greedy, where static
decoding must give the growing-mask loop's tokens (agreement, and the largest log-prob difference). The model
has fp32 weights (a trainer's master copy) and SDPA attention; each of posttrain's static decoding and
transformers' `generate` runs in fp32 and under bf16 autocast, the way both GRPO trainers sample on a GPU.
Results: <out>/hf_decode.json. Without a GPU it runs on CPU, static decoding uncaptured (the suite's smoke test).

    python bench/hf_decode_gpu.py --model runs/smollm2/sft/model --out results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# bench/rewards.py would shadow the `rewards` package: import from the repository root, not from bench/.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

from posttrain.data.prompts import load_prompts  # noqa: E402
from posttrain.generation import SamplingParams, build_backend  # noqa: E402


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(call) -> tuple[float, object]:
    synchronize()
    started = time.perf_counter()
    result = call()
    synchronize()
    return time.perf_counter() - started, result


def count_tokens(groups) -> int:
    return sum(len(c.token_ids) for group in groups for c in group)


def autocast_generate(model, tokenizer, prompts: list[list[int]], params: SamplingParams) -> int:
    """`transformers_generate` under bf16 autocast, as an accelerate-prepared model's forward runs in TRL."""
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        return sum(transformers_generate(model, tokenizer, prompts, params))


def transformers_generate(model, tokenizer, prompts: list[list[int]], params: SamplingParams) -> list[int]:
    """Generated token counts of transformers' `generate` over the left-padded prompts, as TRL calls it."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=params.max_tokens,
            num_return_sequences=params.n,
            pad_token_id=pad,
        )
    completions = out[:, width:]
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    ended = torch.isin(completions, torch.tensor(eos, device=completions.device))
    first = torch.where(ended.any(1), ended.float().argmax(1) + 1, completions.shape[1])
    return first.tolist()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face checkpoint directory")
    p.add_argument("--data", default="data/arith_hard/rl.jsonl")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--greedy-prompts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--profile", action="store_true", help="also the top CUDA kernels of one static sampled call"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    rows = load_prompts([args.data], tokenizer)
    prompts = rows.prompt_ids[: max(args.prompts, args.greedy_prompts)]
    sampled = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=1.0, seed=0)
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    results: dict = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "settings": vars(args),
    }

    # The way each toolkit samples inside its GRPO trainer: posttrain's grpo passes the trainer's bf16 autocast to
    # the backend (`autocast`); TRL's GRPOTrainer calls `generate` on the accelerate-prepared model, whose forward
    # accelerate wraps in the same autocast. The fp32 ways are the previous default and the float reference.
    backends = {
        "dynamic": build_backend("hf", model=model, tokenizer=tokenizer, decode="dynamic"),
        "static": build_backend("hf", model=model, tokenizer=tokenizer, decode="static"),
        "static_bf16_autocast": build_backend(
            "hf", model=model, tokenizer=tokenizer, decode="static", autocast=torch.bfloat16
        ),
    }
    ways = {name: lambda b=backend: count_tokens(b.generate(prompts[: args.prompts], sampled))
            for name, backend in backends.items()}  # fmt: skip
    ways["transformers_generate"] = lambda: sum(
        transformers_generate(model, tokenizer, prompts[: args.prompts], sampled)
    )
    ways["transformers_generate_bf16_autocast"] = lambda: autocast_generate(
        model, tokenizer, prompts[: args.prompts], sampled
    )
    for name, way in ways.items():
        seconds, tokens = [], 0
        for repeat in range(args.repeats + 1):
            elapsed, tokens = timed(way)
            if repeat:
                seconds.append(elapsed)
        median = statistics.median(seconds)
        results[name] = {"s_per_call": median, "tokens": tokens, "tokens_per_s": tokens / median}
        print(name, results[name], flush=True)

    reference = backends["dynamic"].generate(prompts[: args.greedy_prompts], greedy)
    ours = backends["static"].generate(prompts[: args.greedy_prompts], greedy)
    same = sum(a.token_ids == b.token_ids for (a,), (b,) in zip(ours, reference, strict=True))
    gap = max(
        (abs(x - y) for (a,), (b,) in zip(ours, reference, strict=True) if a.token_ids == b.token_ids
         for x, y in zip(a.logprobs, b.logprobs, strict=True)),
        default=0.0,
    )  # fmt: skip
    results["greedy_agreement"] = {"same_tokens": same, "of": len(reference), "max_logprob_diff": gap}
    results["static_speedup"] = results["dynamic"]["s_per_call"] / results["static"]["s_per_call"]
    print(json.dumps({k: results[k] for k in ("greedy_agreement", "static_speedup")}), flush=True)
    mixed = backends["static_bf16_autocast"].generate(prompts[: args.greedy_prompts], greedy)
    results["bf16_autocast_greedy_agreement"] = {
        "same_tokens": sum(a.token_ids == b.token_ids for (a,), (b,) in zip(mixed, reference, strict=True)),
        "of": len(reference),
    }
    results["bf16_autocast_speedup"] = (
        results["static"]["s_per_call"] / results["static_bf16_autocast"]["s_per_call"]
    )
    print(json.dumps({k: results[k] for k in ("bf16_autocast_greedy_agreement", "bf16_autocast_speedup")}))
    if args.profile:
        for name in ("static", "static_bf16_autocast"):
            results[f"{name}_profile"] = profile(backends[name], prompts[: args.prompts], sampled)
    (out / "hf_decode.json").write_text(json.dumps(results, indent=2))
    return results


def profile(backend, prompts: list[list[int]], params: SamplingParams, top: int = 15) -> dict:
    """GPU milliseconds per call by kernel (the `top` largest), and the call's wall-clock."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        elapsed, _ = timed(lambda: backend.generate(prompts, params))
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    table = {e.key[:90]: [round(e.device_time_total / 1e3, 1), e.count] for e in kernels[:top]}
    gpu_ms = sum(e.device_time_total for e in kernels) / 1e3
    print(json.dumps({"wall_s": elapsed, "gpu_ms": gpu_ms, "kernels_ms_count": table}, indent=1), flush=True)
    return {"wall_s": elapsed, "gpu_ms": gpu_ms, "kernels_ms_count": table}


if __name__ == "__main__":
    main()
