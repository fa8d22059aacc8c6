"""The training half of a GRPO step on one GPU: posttrain vs TRL's GRPOTrainer on the same batch.

One step: the reference's log-probs of every completion (no grad), then the policy's log-probs, the GRPO loss
(TRL 1.16's defaults: loss_type "dapo", ε = 0.2, β = 0.04 here so the reference runs, k3 KL with ρ-correction)
and the backward, micro-batch by micro-batch, then clip and AdamW. Generation and rewards are not timed: the
batch (P prompts × G completions with log-normal completion lengths, random tokens, random rewards) is built
once and given to both.

- posttrain (fast): the GRPO trainer with grpo.pack_tokens set (--pack-tokens): prompt + completion of every
  sequence packed without padding into rows (posttrain.trainers.grpo_layouts.micro_batches, exact BFD), attention
  over packed samples (posttrain.fast.attention), per-token log-probs through the head only at completion
  positions, chunked (train.loss_chunk_size = 4096, the default), grpo_loss per pack (micro_batch_loss).
- posttrain (plain): the same trainer functions with pack_tokens unset: right-padded rows of --micro sequences.
- posttrain (fast, compiled): the same with every decoder block compiled (`train.compile_blocks`, on by default
  on CUDA with the vLLM backend); the log-probs go through the fused Triton loss kernel on CUDA (the default).
- TRL: its own compute, driven without generation: GRPOTrainer._get_per_token_logps_and_entropies for the
  reference (as _generate_and_score_completions calls it) and GRPOTrainer.compute_loss per micro-batch of
  per_device_train_batch_size rows (left-padded prompts, right-padded completions), then backward. The only
  harness change: TRL would load the reference model from the hub path in the config; it gets a copy of the
  same random-init model instead. TRL at its best: its padded rows attended by the same varlen kernel after
  unpadding by the attention mask (`posttrain_varlen_unpad`, what flash-attention does for TRL users), with
  and without Liger's kernels (`use_liger_kernel`; TRL 1.16 computes GRPO's log-probs with its own chunked
  fused LM head and offers no Liger GRPO loss any more) and torch.compile of policy and reference (what
  `torch_compile=True` does to the models the Trainer prepares); "TRL's best" is the fastest of them.

All three start from the same weights and see the same batch each step: their per-step losses must agree.

    python bench/grpo_gpu.py --out runs/bench_grpo               # H100, ~1.5 min
    python bench/grpo_gpu.py --tiny --device cpu --steps 2       # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The SFT benchmark's harness, loaded by path: putting bench/ on sys.path would let bench/sandbox.py shadow the
# `sandbox` package for everything imported later in the same process (tests import this file).
_harness = importlib.util.spec_from_file_location("sft_gpu", Path(__file__).resolve().parent / "sft_gpu.py")
sys.modules["sft_gpu"] = importlib.util.module_from_spec(_harness)
_harness.loader.exec_module(sys.modules["sft_gpu"])

from sft_gpu import (  # noqa: E402 (the SFT benchmark's harness: time limit, model, profiler, FLOPs)
    GEMM_CEILING_TFLOPS,
    H100_PEAK_TFLOPS,
    LLAMA_1B,
    ROOT,
    TINY,
    Results,
    build_model,
    check_no_liger_patch,
    cleanup,
    environment,
    make_adamw,
    matmul_params,
    peak_gib,
    start_profiler,
    stop_profiler,
    sync,
)

from posttrain.algorithms.grpo import GRPOLossConfig, group_advantages  # noqa: E402
from posttrain.fast.attention import (  # noqa: E402
    UNPAD_VARLEN_ATTENTION,
    VARLEN_ATTENTION,
    register_varlen_attention,
)
from posttrain.fast.backbone import compile_decoder_layers  # noqa: E402
from posttrain.policy import Policy  # noqa: E402
from posttrain.trainers.grpo import micro_batch_loss  # noqa: E402 (the trainer's own functions are timed)
from posttrain.trainers.grpo_layouts import frozen_logprobs, micro_batches, padded_sequences  # noqa: E402

BETA, EPSILON, TEMPERATURE = 0.04, 0.2, 1.0
LOSS_CHUNK = 4096  # train.loss_chunk_size's default


def make_batch(
    prompts: int, group: int, prompt_range: tuple[int, int], max_completion: int, vocab: int
) -> dict:
    rng = np.random.default_rng(0)
    n = prompts * group
    prompt_lens = np.repeat(rng.integers(*prompt_range, prompts), group)
    median = 300 * max_completion / 1024
    completion_lens = np.clip(np.round(rng.lognormal(math.log(median), 0.8, n)), 1, max_completion).astype(
        int
    )
    prompt_tokens = [rng.integers(3, vocab, p) for p in prompt_lens[::group]]
    return {
        "prompts": [prompt_tokens[i // group] for i in range(n)],
        "completions": [rng.integers(3, vocab, c) for c in completion_lens],
        "rewards": torch.from_numpy(rng.integers(0, 2, n).astype(np.float32)),
        "group": group,
        "max_completion": max_completion,
    }


def grpo_flops(cfg: dict[str, Any], batch: dict) -> float:
    """Policy forward + backward (3×) and reference forward (1×) over prompt + completion tokens; the output head
    only where a completion token is scored; causal attention within each sequence."""
    head = cfg["vocab_size"] * cfg["hidden_size"]
    body = matmul_params(cfg) - head
    width = cfg["num_attention_heads"] * cfg["head_dim"]
    lengths = [len(p) + len(c) for p, c in zip(batch["prompts"], batch["completions"], strict=True)]
    scored = sum(len(c) for c in batch["completions"])
    forward = 2 * body * sum(lengths) + 2 * head * scored
    forward += 4 * cfg["num_hidden_layers"] * width * sum(n * (n + 1) / 2 for n in lengths)
    return 4 * forward  # policy 3×, reference 1×


def loss_config(batch: dict) -> GRPOLossConfig:
    return GRPOLossConfig(
        epsilon=EPSILON, beta=BETA, loss_type="dapo", max_completion_length=batch["max_completion"]
    )


def padded_completion_mask(batch: dict, device: torch.device) -> torch.Tensor:
    """[N, T] with T the longest completion of the batch (as TRL and posttrain's trainer pad)."""
    lens = torch.tensor([len(c) for c in batch["completions"]], device=device)
    return torch.arange(int(lens.max()), device=device)[None, :] < lens[:, None]


# ----------------------------------------------------------------------------------------------------------------
# posttrain: the GRPO trainer's functions, on packed rows (fast) or padded rows (plain)
# ----------------------------------------------------------------------------------------------------------------


def step_posttrain(ctx: dict, model, reference, optimizer, layout: str) -> tuple[float, float]:  # noqa: ANN001
    """The trainer's reference pass and policy pass (one backward per micro-batch) over ctx[layout]."""
    tensors, batches = ctx["tensors"], ctx[layout]
    policy, ref_policy = Policy(model), Policy(reference)
    with ctx["autocast"]():
        ref = frozen_logprobs(ref_policy, tensors, batches, TEMPERATURE, LOSS_CHUNK)
    total = torch.zeros((), device=ctx["device"])
    for micro in batches:
        with ctx["autocast"]():
            loss, _ = micro_batch_loss(
                policy,
                tensors,
                micro,
                ctx["advantages"],
                ctx["loss_cfg"],
                ctx["counts"],
                TEMPERATURE,
                LOSS_CHUNK,
                ref_logps=ref,
            )
        loss.backward()
        total += loss.detach()
    return total, finish_step(model, optimizer)


def finish_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----------------------------------------------------------------------------------------------------------------
# TRL: GRPOTrainer's own log-prob and loss code on the same batch
# ----------------------------------------------------------------------------------------------------------------


def trl_inputs(batch: dict, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """What GRPOTrainer._generate_and_score_completions hands to the loss: left-padded prompts, right-padded
    completions, their masks."""
    n, p_max, c_max = (
        len(batch["prompts"]),
        max(map(len, batch["prompts"])),
        max(map(len, batch["completions"])),
    )
    prompt_ids = np.full((n, p_max), pad_id, np.int64)
    prompt_mask = np.zeros((n, p_max), np.int64)
    completion_ids = np.full((n, c_max), pad_id, np.int64)
    for i, (p, c) in enumerate(zip(batch["prompts"], batch["completions"], strict=True)):
        prompt_ids[i, p_max - len(p) :], prompt_mask[i, p_max - len(p) :] = p, 1
        completion_ids[i, : len(c)] = c
    return {
        "prompt_ids": torch.from_numpy(prompt_ids).to(device),
        "prompt_mask": torch.from_numpy(prompt_mask).to(device),
        "completion_ids": torch.from_numpy(completion_ids).to(device),
        "completion_mask": padded_completion_mask(batch, device).long(),
    }


def make_trl_trainer(
    ctx: dict, model: torch.nn.Module, reference: torch.nn.Module, use_liger: bool = False
) -> Any:
    import trl.trainer.grpo_trainer as grpo_module
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    n = len(ctx["batch"]["completions"])
    grpo_module.create_model_from_path = lambda *args, **kwargs: reference  # no hub: the same random init
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "data" / "tokenizer"))
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=ctx["micro"],
        gradient_accumulation_steps=math.ceil(n / ctx["micro"]),
        num_generations=ctx["batch"]["group"],
        max_completion_length=ctx["batch"]["max_completion"],
        temperature=TEMPERATURE,
        beta=BETA,
        epsilon=EPSILON,
        loss_type="dapo",
        learning_rate=ctx["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=ctx["device"].type == "cuda",
        use_cpu=ctx["device"].type != "cuda",
        report_to="none",
        use_vllm=False,
        use_liger_kernel=use_liger,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * n}),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def step_trl(ctx: dict, model, reference, optimizer) -> tuple[float, float]:  # noqa: ANN001
    trainer, inputs = ctx["trainer"], ctx["trl_inputs"]
    model, ref_model = ctx.get("trl_compiled", (model, trainer.ref_model))
    n, micro = len(ctx["batch"]["completions"]), ctx["micro"]
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        ref, _, _ = trainer._get_per_token_logps_and_entropies(
            ref_model, input_ids, attention_mask, inputs["completion_ids"].shape[1], batch_size=micro
        )
    total = torch.zeros((), device=ctx["device"])
    for start in range(0, n, micro):
        rows = slice(start, min(start + micro, n))
        micro_inputs = {k: v[rows] for k, v in inputs.items()}
        micro_inputs |= {
            "advantages": ctx["advantages"][rows],
            "ref_per_token_logps": ref[rows],
            "num_items_in_batch": inputs["completion_mask"].sum(),
        }
        loss = trainer.compute_loss(model, micro_inputs)
        trainer.accelerator.backward(loss)
        total += loss.detach()
    return total, finish_step(model, optimizer)


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------


def run(
    name: str, ctx: dict, step_fn, attn: str, profile: bool, liger: bool = False, compile_: bool = False
) -> dict[str, Any]:  # noqa: ANN001
    device = ctx["device"]
    if name.startswith("posttrain"):
        check_no_liger_patch()
    model = build_model(ctx["cfg"], attn, device, ctx["state"])
    reference = build_model(ctx["cfg"], attn, device, ctx["state"]).eval().requires_grad_(False)
    if name.startswith("trl"):
        ctx["trainer"] = make_trl_trainer(ctx, model, reference, liger)
        reference = ctx["trainer"].ref_model
        if compile_:  # as `torch_compile=True` has the Trainer do to the models it prepares
            ctx["trl_compiled"] = (torch.compile(model), torch.compile(reference))
    elif compile_:
        compile_decoder_layers(model)
        compile_decoder_layers(reference)
    optimizer = make_adamw(model, ctx["lr"])
    cleanup()
    losses, grad_norms, timed_from = [], [], None
    for step in range(ctx["steps"]):
        if step == ctx["warmup"]:
            sync(device)
            timed_from = time.perf_counter()
        loss, grad_norm = step_fn(ctx, model, reference, optimizer)
        losses.append(loss)
        grad_norms.append(grad_norm)
    sync(device)
    seconds = (time.perf_counter() - timed_from) / (ctx["steps"] - ctx["warmup"])
    result: dict[str, Any] = {
        "losses": [float(x) for x in losses],
        "grad_norms": [float(x) for x in grad_norms],
        "step_s": seconds,
        "peak_gib": peak_gib(device),
        "real_tokens_per_s": ctx["real_tokens"] / seconds,
        "model_tflops": ctx["flops"] / seconds / 1e12,
    }
    result["mfu_vs_989"] = result["model_tflops"] / H100_PEAK_TFLOPS
    result["mfu_vs_770"] = result["model_tflops"] / GEMM_CEILING_TFLOPS
    if profile:
        prof = start_profiler(device)
        step_fn(ctx, model, reference, optimizer)
        result["profile"] = stop_profiler(prof, device, 1)
    ctx.pop("trainer", None)
    ctx.pop("trl_compiled", None)
    del model, reference, optimizer
    return result


def agreement(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Largest relative differences of the per-step losses and gradient norms of two runs."""
    losses = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(run["losses"], reference["losses"], strict=True)]
    norms = [abs(a - b) / b for a, b in zip(run["grad_norms"], reference["grad_norms"], strict=True)]
    return {"loss_max_abs_rel": max(losses), "grad_norm_max_rel": max(norms)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--micro", type=int, default=8, help="rows per micro-batch (TRL, posttrain plain)")
    parser.add_argument(
        "--pack-tokens", type=int, default=8192, help="tokens per packed row (posttrain fast)"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--time-limit", type=float, default=150.0)
    parser.add_argument("--only", nargs="*", help="run only these sections (names as in the results)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/bench_grpo"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cfg = TINY if args.tiny else LLAMA_1B
    max_completion, prompt_range = (32, (4, 16)) if args.tiny else (1024, (64, 512))
    pack_tokens = 128 if args.tiny else args.pack_tokens
    results = Results(Path(args.out), "grpo_gpu", args.time_limit, args.only)
    results.data["env"] = environment(device)
    results.data["command"] = " ".join(["grpo_gpu.py", *(argv if argv is not None else sys.argv[1:])])
    register_varlen_attention()

    batch = make_batch(args.prompts, args.group, prompt_range, max_completion, cfg["vocab_size"])
    advantages, _ = group_advantages(batch["rewards"], args.group)
    torch.manual_seed(0)
    state = {
        k: v.detach().cpu().clone() for k, v in build_model(cfg, "sdpa", device, None).state_dict().items()
    }
    cleanup()
    completion_mask = padded_completion_mask(batch, device)
    tensors = padded_sequences(
        [p.tolist() for p in batch["prompts"]], [c.tolist() for c in batch["completions"]], pad_id=0
    )
    tensors = {name: t.to(device) for name, t in tensors.items()}
    real_tokens = sum(len(p) + len(c) for p, c in zip(batch["prompts"], batch["completions"], strict=True))
    autocast_on = device.type == "cuda"
    ctx = {
        "device": device,
        "cfg": cfg,
        "state": state,
        "batch": batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "micro": args.micro,
        "lr": args.lr,
        "advantages": advantages.to(device),
        "completion_mask": completion_mask,
        "loss_cfg": loss_config(batch),
        "real_tokens": real_tokens,
        "flops": grpo_flops(cfg, batch),
        "autocast": lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_on),
        "tensors": tensors,
        "counts": torch.stack([completion_mask.sum(), torch.tensor(len(completion_mask), device=device)]),
        "packs": micro_batches(tensors, args.micro, pack_tokens),
        "padded": micro_batches(tensors, args.micro, None),
        "trl_inputs": trl_inputs(batch, pad_id=0, device=device),
    }
    slots = len(batch["prompts"]) * (max(map(len, batch["prompts"])) + int(completion_mask.shape[1]))
    results.data["batch"] = {
        "sequences": len(batch["prompts"]),
        "real_tokens": real_tokens,
        "completion_tokens": int(completion_mask.sum()),
        "trl_padded_slots": slots,
        "posttrain_packs": len(ctx["packs"]),
        "model_tflop_per_step": ctx["flops"] / 1e12,
    }
    packed, padded = partial(step_posttrain, layout="packs"), partial(step_posttrain, layout="padded")
    plan = [  # name, step, attention, seconds needed at least, Liger, compiled
        ("posttrain_fast", packed, VARLEN_ATTENTION, 30, False, False),
        ("posttrain_fast_compiled", packed, VARLEN_ATTENTION, 90, False, True),
        ("trl_unpad", step_trl, UNPAD_VARLEN_ATTENTION, 45, False, False),
        ("trl_unpad_compile", step_trl, UNPAD_VARLEN_ATTENTION, 90, False, True),
        ("posttrain_plain", padded, VARLEN_ATTENTION, 45, False, False),
        ("trl_sdpa", step_trl, "sdpa", 60, False, False),
        # last: TRL's use_liger_kernel patches transformers' Llama for the whole process
        ("trl_unpad_liger", step_trl, UNPAD_VARLEN_ATTENTION, 45, True, False),
        ("trl_unpad_liger_compile", step_trl, UNPAD_VARLEN_ATTENTION, 90, True, True),
    ]
    for name, step_fn, attn, needs, liger, compile_ in plan:
        results.section(
            name,
            needs,
            lambda n=name, s=step_fn, a=attn, li=liger, c=compile_: run(
                n, ctx, s, a, profile=device.type == "cuda", liger=li, compile_=c
            ),
        )

    sections = results.data["sections"]
    done = {k: v for k, v in sections.items() if "step_s" in v}
    ours = {k: v for k, v in done.items() if k.startswith("posttrain_fast")}
    theirs = {k: v for k, v in done.items() if k.startswith("trl")}
    if ours and theirs:
        best_ours, best_theirs = (
            min(ours, key=lambda k: ours[k]["step_s"]),
            min(theirs, key=lambda k: theirs[k]["step_s"]),
        )
        results.data["speedup_vs_trl"] = {
            "posttrain_best": best_ours,
            "trl_best": best_theirs,
            "trl_variants_step_s": {k: round(v["step_s"], 4) for k, v in theirs.items()},
            "ratio": theirs[best_theirs]["step_s"] / ours[best_ours]["step_s"],
        }
        results.data["agreement_vs_trl"] = {k: agreement(v, theirs[best_theirs]) for k, v in ours.items()}
    if "posttrain_fast" in done and "posttrain_plain" in done:
        results.data["speedup_vs_plain"] = (
            done["posttrain_plain"]["step_s"] / done["posttrain_fast"]["step_s"]
        )
        results.data["agreement_vs_plain"] = agreement(done["posttrain_fast"], done["posttrain_plain"])
    results.save()
    lines = [
        f"# GRPO training step ({results.data['env'].get('gpu', device)})",
        "",
        f"batch: {results.data['batch']}",
        "",
    ]
    lines += [
        "| run | step s | real tokens/s | model TFLOP/s | MFU (989) | MFU (770) | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, value in sections.items():
        if "step_s" in value:
            peak = value["peak_gib"]
            lines.append(
                f"| {name} | {value['step_s']:.3f} | {value['real_tokens_per_s']:,.0f} | {value['model_tflops']:.1f} | "
                f"{100 * value['mfu_vs_989']:.1f}% | {100 * value['mfu_vs_770']:.1f}% | {'-' if peak is None else f'{peak:.1f}'} |"
            )
        else:
            lines.append(f"| {name} | {value.get('skipped') or value.get('error', '')[:100]} | | | | | |")
    for key in ("speedup_vs_trl", "agreement_vs_trl", "speedup_vs_plain", "agreement_vs_plain"):
        if key in results.data:
            lines.append(f"\n**{key}**: {results.data[key]}")
    for name, value in sections.items():
        if "profile" in value:
            lines.append(
                f"\nprofile {name}: {value['profile']['share']} ({value['profile']['gpu_ms_per_step']:.1f} ms)"
            )
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "grpo_gpu.md").write_text(text)
    print(text, flush=True)
    return results.data


if __name__ == "__main__":
    main()
