"""GRPO step throughput: posttrain's trainer against TRL 1.16's GRPOTrainer, same work on both sides.

    .venv/bin/python bench/grpo.py                          # 8 prompts x G=8, 64 new tokens, 1 thread
    .venv/bin/python bench/grpo.py --steps 5 --warmup 1 --repeats 3 --threads 2
    python3 bench/grpo.py --device cuda --model qwen2_0.5b --layout packed     # GPU: bf16 autocast both sides

One configuration, identical on both sides:
- the same randomly initialised Qwen2 (`--model tiny`: hidden 256, 4 layers; `qwen2_0.5b`: Qwen2-0.5B's shape
  with the bundled tokenizer's vocabulary), saved once, fp32 weights; no autocast on CPU, bf16 autocast on CUDA;
- the same tokenizer (data/tokenizer) and prompts (data/arith/rl.jsonl, chat template applied);
- a step = P prompts x G completions sampled with transformers `generate` (KV cache, temperature 1, no top-p
  or top-k), scored by `rewards.math_accuracy` (TRL gets it as a plain reward function), group advantages,
  one optimiser step (mu = 1, beta = 0: no reference model, loss_type dapo, eps 0.2 / 0.28, AdamW, clip 1.0);
- fixed-length completions: the saved tokenizer's EOS is an added token whose id is outside the model's
  vocabulary, so it is never sampled and every completion has exactly `--max-tokens` tokens. No stop strings.
  Then both sides generate and train on the same number of tokens per step.
- posttrain's loss gets `tis_cap: None`: TRL applies no importance-sampling correction without vLLM;
- posttrain scores each prompt once for its G completions (`grpo.share_prompt`, `--layout shared_prompt`, the
  default on CPU; the log-probs, loss and gradients are those of padded rows, tests/trainers/test_grpo_packed.py);
  `--layout packed` packs rows without padding (`grpo.pack_tokens`, the GPU's varlen attention; the default on
  CUDA); `--layout padded` scores G padded rows per prompt as TRL does;
- each side runs in its own subprocess with `--threads` torch threads, sides alternate (A B A B ...) so that
  load from other processes on a shared machine hits both alike. The default is 1 thread: on a loaded machine
  (more runnable processes than cores) OpenMP's barriers make 2 threads 5-10x slower than 1 for this model.

Measured per step after `--warmup` steps: wall time between the ends of consecutive optimiser steps (everything
the trainer does in a step, logging included), the time inside `generate` and the rest (rewards, log-probs,
backward, optimiser). tokens/s counts prompt + completion tokens of the step; generated tokens/s only the
completions. Each repeat gives a median over its steps; the table shows the best and the median repeat.
Start-up (imports, model load, worker pools) is not timed on either side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ROOT / "data" / "arith" / "rl.jsonl"
TOKENIZER = ROOT / "data" / "tokenizer"
NEVER_SAMPLED_EOS = "<|bench_eos|>"

MODEL_CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": None,
    "pad_token_id": 0,
}


MODEL_SHAPES = {
    "tiny": {},
    "qwen2_0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
    },
}


def build_model(directory: Path, seed: int, shape: str) -> None:
    """Save the shared random model and a tokenizer whose EOS the model can never emit."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    vocab = len(tokenizer)  # the model's vocabulary: every real token, but not the EOS added below
    tokenizer.add_special_tokens({"eos_token": NEVER_SAMPLED_EOS})
    eos = tokenizer.convert_tokens_to_ids(NEVER_SAMPLED_EOS)
    if eos < vocab:
        raise RuntimeError(f"the added EOS got id {eos}, inside the model's vocabulary of {vocab}")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**{**MODEL_CONFIG, **MODEL_SHAPES[shape], "vocab_size": vocab})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def prompt_lengths(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    from posttrain.data.prompts import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [len(ids) for ids in load_prompts([str(PROMPTS)], tokenizer).prompt_ids]


def run_posttrain(args: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    from posttrain.config import GRPORecipe
    from posttrain.trainers.grpo import step_prompt_ids, train_grpo

    total = args.warmup + args.steps
    recipe = GRPORecipe.model_validate(
        {
            "model": {
                "path": str(model_dir),
                "mtp": {"enabled": False},
                # shared prompts need a dense mask: SDPA; packed rows take the varlen kernel on CUDA
                "attn_implementation": "sdpa" if args.layout == "shared_prompt" else "auto",
            },
            "data": {"train": [str(PROMPTS)]},
            "generation": {"backend": "hf", "max_tokens": args.max_tokens, "temperature": 1.0, "stop": []},
            "rewards": {"functions": [{"name": "math_accuracy", "weight": 1.0}]},
            "grpo": {
                "prompts_per_step": args.prompts,
                "num_generations": args.generations,
                "num_iterations": 1,
                "micro_batch_size": args.prompts * args.generations,
                "share_prompt": args.layout == "shared_prompt",
                "pack_tokens": PACK_TOKENS if args.layout == "packed" else None,
                # TRL applies no importance-sampling correction with transformers generate: neither do we here.
                "loss": {
                    "loss_type": "dapo",
                    "epsilon": 0.2,
                    "epsilon_high": 0.28,
                    "beta": 0.0,
                    "tis_cap": None,
                },
            },
            "train": {
                "max_steps": total,
                "lr": 1e-6,
                "min_lr": 1e-6,
                "seed": 0,
                "mixed_precision": "bf16" if args.device == "cuda" else "no",
            },
            "logging": {"tensorboard": False, "progress": False},
            "output_dir": str(out / "posttrain_run"),
        }
    )
    train_grpo(recipe)
    rows = [json.loads(line) for line in (out / "posttrain_run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r]
    lengths = prompt_lengths(model_dir)
    steps = []
    for previous, row in zip(rows, rows[1:], strict=False):
        ids = step_prompt_ids(row["step"] - 1, len(lengths), args.prompts, recipe.train.seed)
        steps.append(
            {
                "wall_s": row["time"] - previous["time"],
                "generation_s": row["time/generation_s"],
                "prompt_tokens": args.generations * sum(lengths[int(i)] for i in ids),
                "completion_tokens": row["completion_length/mean"] * args.prompts * args.generations,
            }
        )
    return {"steps": steps[args.warmup - 1 :]}


def run_trl(args: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards import math_accuracy

    record: dict[str, list] = {"end": [], "generation_s": [], "prompt_tokens": [], "completion_tokens": []}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, *rest, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *rest, **kwargs)
            record["generation_s"].append(time.perf_counter() - t0)
            record["prompt_tokens"].append(sum(len(p) for p in prompt_ids))
            record["completion_tokens"].append(sum(len(c) for c in completion_ids))
            return completion_ids, logprobs

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs) -> None:  # noqa: ANN002, ANN003
            record["end"].append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(out / "trl_run"),
        per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        num_iterations=1,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        learning_rate=1e-6,
        max_grad_norm=1.0,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=args.device == "cuda",
        use_cpu=args.device == "cpu",
        use_vllm=False,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = TimedGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[math_accuracy],
        args=config,
        train_dataset=load_dataset("json", data_files=str(PROMPTS), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        callbacks=[StepEnd()],
    )
    trainer.train()
    steps = [
        {
            "wall_s": end - previous,
            "generation_s": record["generation_s"][i + 1],
            "prompt_tokens": record["prompt_tokens"][i + 1],
            "completion_tokens": record["completion_tokens"][i + 1],
        }
        for i, (previous, end) in enumerate(zip(record["end"], record["end"][1:], strict=False))
    ]
    return {"steps": steps[args.warmup - 1 :]}


def summarise(steps: list[dict]) -> dict[str, float]:
    """Median step of one repeat, and the throughputs it implies."""
    wall = statistics.median(s["wall_s"] for s in steps)
    generation = statistics.median(s["generation_s"] for s in steps)
    tokens = statistics.median(s["prompt_tokens"] + s["completion_tokens"] for s in steps)
    generated = statistics.median(s["completion_tokens"] for s in steps)
    return {
        "step_s": wall,
        "generation_s": generation,
        "other_s": wall - generation,
        "steps_per_s": 1 / wall,
        "tokens_per_s": tokens / wall,
        "generated_tokens_per_s": generated / wall,
        "tokens_per_step": tokens,
        "generated_tokens_per_step": generated,
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model_dir, out = Path(args.model_dir), Path(args.worker_out)
    run = run_posttrain if args.worker == "posttrain" else run_trl
    result = run(args, model_dir, out)
    (out / "result.json").write_text(json.dumps(result))


def spawn(side: str, args: argparse.Namespace, model_dir: Path, repeat: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{side}-{repeat}-", dir=args.out))
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--model-dir",
        str(model_dir),
        "--worker-out",
        str(out),
        *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHARED_ARGS),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"{side} run {repeat} failed (exit {done.returncode})")
    result = json.loads((out / "result.json").read_text())
    result["process_s"] = time.perf_counter() - started
    return result


SHARED_ARGS = (
    "steps",
    "warmup",
    "prompts",
    "generations",
    "max_tokens",
    "threads",
    "layout",
    "device",
    "model",
)
PACK_TOKENS = 8192


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| side | repeat | step s | generate s | rest s | steps/s | tokens/s | generated tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side in ("posttrain", "trl"):
        for which in ("best", "median"):
            s = summary[side][which]
            lines.append(
                f"| {side} | {which} | {s['step_s']:.2f} | {s['generation_s']:.2f} | {s['other_s']:.2f} "
                f"| {s['steps_per_s']:.3f} | {s['tokens_per_s']:.0f} | {s['generated_tokens_per_s']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    # Run as a script, this file's folder comes first on sys.path and bench/rewards.py would shadow `rewards`.
    sys.path[:] = [str(ROOT)] + [
        p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
    ]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per completion")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of each side (1: see the docstring)"
    )
    parser.add_argument(
        "--layout",
        choices=["shared_prompt", "packed", "padded"],
        help="how posttrain feeds the rollouts to the model (default: shared_prompt on CPU, packed on CUDA)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=list(MODEL_SHAPES), default="tiny")
    parser.add_argument("--out", default="/tmp/posttrain-bench-grpo", help="folder for runs and results.json")
    parser.add_argument("--worker", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's wall time has no start mark)")
    if args.layout is None:
        args.layout = "packed" if args.device == "cuda" else "shared_prompt"
    if args.worker:
        worker(args)
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    model_dir = out / "model"
    build_model(model_dir, seed=0, shape=args.model)
    repeats: dict[str, list[dict]] = {"posttrain": [], "trl": []}
    for repeat in range(args.repeats):
        for side in ("posttrain", "trl"):
            result = spawn(side, args, model_dir, repeat)
            repeats[side].append({**summarise(result["steps"]), "process_s": result["process_s"]})
            print(f"{side} repeat {repeat}: {repeats[side][-1]['step_s']:.2f} s/step", flush=True)

    summary = {
        side: {
            "best": min(runs, key=lambda r: r["step_s"]),
            "median": sorted(runs, key=lambda r: r["step_s"])[(len(runs) - 1) // 2],
        }
        for side, runs in repeats.items()
    }
    speedup = {
        which: summary["trl"][which]["step_s"] / summary["posttrain"][which]["step_s"]
        for which in summary["trl"]
    }
    report = {
        "config": {k: getattr(args, k) for k in (*SHARED_ARGS, "repeats")}
        | {"model": {**MODEL_CONFIG, **MODEL_SHAPES[args.model]}},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "repeats": repeats,
        "summary": summary,
        "speedup_posttrain_over_trl": speedup,
    }
    report["table"] = table(summary)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print()
    print(report["table"])
    print(
        f"\nposttrain / TRL speed: {speedup['best']:.2f}x (best repeats), {speedup['median']:.2f}x (median); "
        f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; results: {out / 'results.json'}"
    )


if __name__ == "__main__":
    main()
