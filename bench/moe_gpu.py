"""SFT training step of a small DeepSeek-V3-shaped MoE on one GPU: posttrain's model vs transformers' on the same
config, weights, data and step code.

Model (MOE_2B): hidden 2048, 8 layers (the first dense, 7 DeepSeekMoE), MLA with 16 heads (q_lora 768, kv_lora
512, q/k head 128 + 64 RoPE, v head 128), 64 routed experts (intermediate 640) top-6 within the best 4 of 8
groups, 2 shared experts, vocab 32768: 2.1B parameters, ~0.41B active per token. fp32 master weights, bf16
autocast, fused AdamW (posttrain.trainers.loop.make_optimizer), clip 1.0; `--weights bf16` keeps the weights
themselves in bf16 instead. Data: bench/sft_gpu.py's samples (log-normal lengths, median 600, packed into
4096-token rows), 2 packs per optimiser step, the same packs in the same order for every run.

Runs (the step is the SFT trainer's: Policy forward with the hidden states only, chunked cross-entropy through
the head, plain cross-entropy on the MTP logits, L = L_main + λ/D·Σ L_mtp, backward, clip, AdamW, expert-bias
update):
  posttrain         posttrain.model.DeepseekV3ForCausalLM (grouped-GEMM MoE, varlen MLA), MTP off
  transformers      transformers' DeepseekV3ForCausalLM with the same weights, its default attention (sdpa, a
                    dense packed mask) and experts implementation, MTP off
  posttrain_mtp     posttrain with one MTP module (λ = the SFT recipe's default weight)
  posttrain_bf16, transformers_bf16   (if time is left, and --weights is fp32) both with bf16 weights
  posttrain_fp8     posttrain with `train.fp8` (convert_to_fp8): block-scaled FP8 GEMMs in every nn.Linear (MLA
                    projections, shared experts, the dense layer's MLP); the routed experts' grouped GEMMs, the
                    router and the head stay in bf16

Before anything is timed, posttrain's and transformers' step-0 loss and final hidden states on the first batch
must agree (the script stops otherwise); the per-step losses of the first two runs are compared afterwards.
Expert-bias updates default to γ = 0 (--expert-bias-update) because transformers has none: the losses then stay
comparable step by step.

Reported per run: tokens/s (real tokens), step time, MFU over the active parameters (6·N_active·tokens + causal
attention within each sample, over the H100's 989 TFLOP/s dense bf16 peak and the 770 TFLOP/s measured GEMM
ceiling), peak memory, losses; for posttrain a torch.profiler split of GPU time (attention, GEMM and grouped GEMM,
MoE routing/permutation, loss, optimiser, other; by kernel name, so approximate).

    python bench/moe_gpu.py --out runs/bench_moe --time-limit 420      # H100, < 8 min
    python bench/moe_gpu.py --tiny --device cpu                       # smoke test of every code path (CPU)
    python bench/moe_gpu.py --only posttrain posttrain_fp8            # FP8 on and off
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The SFT benchmark's harness, loaded by path as bench/grpo_gpu.py does (bench/ on sys.path would let
# bench/sandbox.py shadow the `sandbox` package).
_harness = importlib.util.spec_from_file_location("sft_gpu", Path(__file__).resolve().parent / "sft_gpu.py")
sys.modules["sft_gpu"] = importlib.util.module_from_spec(_harness)
_harness.loader.exec_module(sys.modules["sft_gpu"])

from sft_gpu import (  # noqa: E402 (time limit, results, data, packing, profiler)
    GEMM_CEILING_TFLOPS,
    H100_PEAK_TFLOPS,
    KERNEL_KINDS,
    Packs,
    Results,
    batch_tensors,
    cleanup,
    compare_losses,
    environment,
    make_samples,
    markdown,
    pack_like_trl,
    peak_gib,
    start_profiler,
    stop_profiler,
    sync,
)

from posttrain.algorithms.sft import mtp_combined_loss, shifted_targets, token_cross_entropy_sum  # noqa: E402
from posttrain.config import MTPSection, TrainSection  # noqa: E402
from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum  # noqa: E402
from posttrain.model import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from posttrain.model.fp8_linear import convert_to_fp8  # noqa: E402
from posttrain.policy import Policy  # noqa: E402
from posttrain.trainers.loop import make_optimizer, update_expert_bias  # noqa: E402

MOE_2B = {
    "vocab_size": 32768,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 640,
    "num_hidden_layers": 8,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": 768,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
TINY = {
    **MOE_2B,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "max_position_embeddings": 1024,
}

# Kernel kinds for the profile split: sft_gpu's, plus the MoE's routing and token permutation, tried before GEMMs
# (cuBLAS/CUTLASS names; aten::* names on a CPU run). The loss's softmax/logsumexp kernels come before routing.
_SFT_KINDS = dict(KERNEL_KINDS)
MOE_KERNEL_KINDS = [
    ("attention", _SFT_KINDS["attention"]),
    ("optimizer", _SFT_KINDS["optimizer"]),
    ("loss", re.compile(r"cross_entropy|log_softmax|softmax|logsumexp|nll|liger", re.I)),
    (
        "moe_routing",
        re.compile(r"topk|sort|scan|scatter|gather|index|cumsum|histc|bincount|sigmoid|masked_fill", re.I),
    ),
    ("gemm", re.compile(_SFT_KINDS["gemm"].pattern + r"|grouped_mm|aten::mm|aten::bmm|addmm", re.I)),
]


# ----------------------------------------------------------------------------------------------------------------
# FLOPs over the active parameters
# ----------------------------------------------------------------------------------------------------------------


def layer_matmul_params(config: DeepseekV3Config, layer_idx: int) -> int:
    """Weights one token is multiplied by in block `layer_idx`: MLA's projections, then the dense MLP or the
    router, the shared experts and its top-k routed experts."""
    d, heads = config.hidden_size, config.num_attention_heads
    q_out = heads * config.qk_head_dim
    query = d * q_out if config.q_lora_rank is None else d * config.q_lora_rank + config.q_lora_rank * q_out
    latent = d * (config.kv_lora_rank + config.qk_rope_head_dim)
    keys_values = config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
    attention = query + latent + keys_values + heads * config.v_head_dim * d
    if not config.is_moe_layer(layer_idx):
        return attention + 3 * d * config.intermediate_size
    expert = 3 * d * config.moe_intermediate_size
    experts = (config.n_shared_experts + config.num_experts_per_tok) * expert
    return attention + d * config.n_routed_experts + experts


def active_matmul_params(config: DeepseekV3Config, mtp_depth: int = 0) -> dict[str, int]:
    """Active parameters per token of the main model (blocks + output head) and of each MTP module (eh_proj, its
    block, the shared head)."""
    d, vocab = config.hidden_size, config.vocab_size
    main = sum(layer_matmul_params(config, i) for i in range(config.num_hidden_layers)) + vocab * d
    first = config.num_hidden_layers
    mtp = [2 * d * d + layer_matmul_params(config, first + k) + vocab * d for k in range(mtp_depth)]
    return {"main": main, "mtp": sum(mtp)}


def training_flops(config: DeepseekV3Config, sample_lengths: list[int], mtp_depth: int) -> float:
    """6·N_active·tokens, plus causal attention within each sample: per layer and pair of tokens, QKᵀ costs
    2·H·d_qk and PV 2·H·d_v FLOPs forward, backward twice that. MTP module k sees the tokens of each sample but
    its last k (and attends over them as one more layer)."""
    params = active_matmul_params(config, mtp_depth)
    per_pair = 6 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    pairs = sum(n * (n + 1) / 2 for n in sample_lengths)
    flops = 6.0 * params["main"] * sum(sample_lengths) + per_pair * config.num_hidden_layers * pairs
    if mtp_depth:
        tokens = sum(sample_lengths) - len(sample_lengths)
        flops += 6.0 * params["mtp"] * tokens + per_pair * mtp_depth * pairs
    return flops


def throughput(
    config: DeepseekV3Config, step_lengths: list[list[int]], seconds: float, mtp_depth: int
) -> dict[str, float]:
    tokens = sum(sum(lengths) for lengths in step_lengths)
    tflops = sum(training_flops(config, lengths, mtp_depth) for lengths in step_lengths) / seconds / 1e12
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(step_lengths),
        "model_tflops": tflops,
        "mfu_vs_989": tflops / H100_PEAK_TFLOPS,
        "mfu_vs_770": tflops / GEMM_CEILING_TFLOPS,
        "seconds": seconds,
        "tokens": tokens,
    }


# ----------------------------------------------------------------------------------------------------------------
# Models: posttrain's and transformers', from one state dict
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    config: DeepseekV3Config
    packs: Packs
    state: dict[str, torch.Tensor]  # posttrain's MTP-off model at init, on the CPU
    train: TrainSection
    mtp_weight: float
    expert_bias_update: float
    weights: torch.dtype
    steps: int
    warmup: int
    batch: int
    profile_steps: int

    def step_lengths(self, steps: range) -> list[list[int]]:
        return [self.packs.lengths(range(s * self.batch, (s + 1) * self.batch)) for s in steps]


def build_posttrain(ctx: Context, mtp_depth: int, weights: torch.dtype) -> DeepseekV3ForCausalLM:
    """posttrain's model with the shared weights; a fresh (seeded) MTP module when mtp_depth > 0."""
    config = DeepseekV3Config.from_dict(ctx.config.to_dict(), num_nextn_predict_layers=mtp_depth)
    with torch.device(ctx.device):
        model = DeepseekV3ForCausalLM(config, init_weights=False, attn_implementation="varlen")
    missing, unexpected = model.load_state_dict(ctx.state, strict=False)
    if unexpected or any(not name.startswith("model.mtp_layers.") for name in missing):
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if mtp_depth:
        torch.manual_seed(1)
        model.init_weights(model.model.mtp_layers)
    return model.to(weights).train()


def build_posttrain_fp8(ctx: Context) -> DeepseekV3ForCausalLM:
    """posttrain's model as `train.fp8` runs it: every nn.Linear but the head and the router in FP8."""
    model = build_posttrain(ctx, 0, ctx.weights)
    if not convert_to_fp8(model):
        raise ValueError("convert_to_fp8 found no nn.Linear layers in posttrain's DeepSeek-V3")
    return model


def build_transformers(ctx: Context, weights: torch.dtype) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM from the same config.json contents and the same weights."""
    from transformers import AutoModelForCausalLM
    from transformers import DeepseekV3Config as HFConfig

    config = HFConfig.from_dict(ctx.config.to_dict())
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.load_state_dict(ctx.state, strict=True)
    model.config.use_cache = False
    return model.to(weights).train()


# ----------------------------------------------------------------------------------------------------------------
# The SFT trainer's step
# ----------------------------------------------------------------------------------------------------------------


def sft_loss(
    policy: Policy, batch: dict[str, torch.Tensor], mtp_depth: int, ctx: Context
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch as posttrain.trainers.sft computes it (here the whole step): returns (L, L_main)."""
    targets = [
        shifted_targets(batch["input_ids"], batch["loss_mask"], batch["position_ids"], shift=1 + k)
        for k in range(mtp_depth + 1)
    ]
    counts = [(t != -100).sum() for t in targets]
    out = policy(
        batch["input_ids"],
        batch["position_ids"],
        with_mtp=mtp_depth > 0,
        hidden_only=True,
        cu_seqlens=batch["cu_seqlens"],
    )
    hidden = out.hidden.flatten(0, 1)
    sums = [
        chunked_token_cross_entropy_sum(
            hidden, out.head_weight, targets[0].flatten(), ctx.train.loss_chunk_size
        )[0]
    ]
    sums += [
        token_cross_entropy_sum(logits, t[:, : logits.shape[1]])[0]
        for logits, t in zip(out.mtp_logits, targets[1:], strict=True)
    ]
    loss = mtp_combined_loss(sums[0], counts[0], sums[1:], counts[1:], ctx.mtp_weight)
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    return loss, sums[0] / counts[0].clamp(min=1)


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_run(
    ctx: Context, build: Callable[[], torch.nn.Module], mtp_depth: int, profile: bool = False
) -> dict[str, Any]:
    device = ctx.device
    cleanup()
    policy = Policy(build())
    optimizer = make_optimizer(list(policy.parameters()), ctx.train)
    dataset = ctx.packs.dataset(pad_id=0)
    losses, main_losses, seconds = [], [], None
    total_steps = ctx.steps + (ctx.profile_steps if profile else 0)
    profiler, timed_from = None, None
    for step in range(total_steps):
        if step == ctx.warmup:
            sync(device)
            timed_from = time.perf_counter()
        if profile and step == ctx.steps:
            profiler = start_profiler(device)
        batch = batch_tensors(dataset, range(step * ctx.batch, (step + 1) * ctx.batch), device)
        with autocast(device):
            loss, main = sft_loss(policy, batch, mtp_depth, ctx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), ctx.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_expert_bias(policy, ctx.expert_bias_update)
        losses.append(loss.detach())
        main_losses.append(main.detach())
        if step == ctx.steps - 1:
            sync(device)
            seconds = time.perf_counter() - timed_from
    result = {
        "model": type(policy.model).__module__ + "." + type(policy.model).__name__,
        "mtp_depth": mtp_depth,
        "weights": str(next(policy.parameters()).dtype),
        "parameters": sum(p.numel() for p in policy.parameters()),
        "losses": [float(x) for x in losses[: ctx.steps]],
        "main_losses": [float(x) for x in main_losses[: ctx.steps]],
        "peak_gib": peak_gib(device),
        **throughput(ctx.config, ctx.step_lengths(range(ctx.warmup, ctx.steps)), seconds, mtp_depth),
    }
    if profiler is not None:
        result["profile"] = stop_profiler(profiler, device, ctx.profile_steps, MOE_KERNEL_KINDS)
    del policy, optimizer
    return result


@torch.no_grad()
def step0_parity(ctx: Context, tolerance: dict[str, float]) -> dict[str, Any]:
    """posttrain's and transformers' loss and final hidden states on one batch, before any timing: the packs
    with the most samples (best-fit-decreasing puts the longest samples, alone, in the first packs)."""
    used = range(ctx.batch * (ctx.steps + ctx.profile_steps))
    busiest = sorted(used, key=lambda i: -len(ctx.packs.packs[i]))[: ctx.batch]
    batch = batch_tensors(ctx.packs.dataset(pad_id=0), busiest, ctx.device)
    values = {}
    for name, build in (
        ("posttrain", lambda: build_posttrain(ctx, 0, ctx.weights)),
        ("transformers", lambda: build_transformers(ctx, ctx.weights)),
    ):
        cleanup()
        policy = Policy(build().float())  # fp32, no autocast: in bf16, random-init router ties flip experts
        loss = sft_loss(policy, batch, 0, ctx)[0]
        hidden = policy(batch["input_ids"], batch["position_ids"], hidden_only=True).hidden
        values[name] = (float(loss), hidden.float().cpu())
        del policy
    (ours, our_hidden), (theirs, their_hidden) = values["posttrain"], values["transformers"]
    result = {
        "loss_posttrain": ours,
        "loss_transformers": theirs,
        "loss_rel_diff": abs(ours - theirs) / abs(theirs),
        "hidden_rel_diff": float((our_hidden - their_hidden).norm() / their_hidden.norm()),
        "tolerance": tolerance,
        "packs": busiest,
        "samples_in_batch": sum(len(ctx.packs.packs[i]) for i in busiest),
    }
    result["agree"] = (
        result["loss_rel_diff"] <= tolerance["loss"] and result["hidden_rel_diff"] <= tolerance["hidden"]
    )
    return result


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short packs (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="optimiser steps per run, the first --warmup untimed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="packs per optimiser step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help="master weight dtype")
    parser.add_argument(
        "--expert-bias-update", type=float, default=0.0, help="γ of the bias update (0: none)"
    )
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds for the whole script")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/bench_moe"))
    parser.add_argument("--only", nargs="*", help="run only these runs (names as in the results)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(
            1
        )  # tiny matrices: OpenMP barriers cost more than they save (100x on 2 busy cores)
    steps = args.steps or (4 if args.tiny else 12)
    capacity = 256 if args.tiny else 4096
    config = DeepseekV3Config.from_dict(TINY if args.tiny else MOE_2B)
    results = Results(Path(args.out), "moe_gpu", args.time_limit, args.only)
    results.data["env"] = environment(device)
    results.data["command"] = " ".join(["moe_gpu.py", *(argv if argv is not None else sys.argv[1:])])

    n_packs = args.batch * (steps + args.profile_steps)
    samples = make_samples(
        int(n_packs * capacity / (700 * capacity / 4096)) + 40, capacity, config.vocab_size, 0
    )
    packs = results.section("packing", 5, lambda: pack_like_trl(samples, capacity))
    if packs is None or len(packs.packs) < n_packs:
        raise SystemExit(f"not enough packs ({0 if packs is None else len(packs.packs)} < {n_packs})")
    results.data["sections"]["packing"] = {**packs.notes, "source": packs.source}

    torch.manual_seed(0)
    with torch.device(device):
        reference = DeepseekV3ForCausalLM(config)  # the state every run starts from, kept on the CPU
    ctx = Context(
        device=device,
        config=config,
        packs=packs,
        state={k: v.detach().to("cpu", copy=True) for k, v in reference.state_dict().items()},
        train=TrainSection(lr=args.lr, betas=(0.9, 0.95), max_grad_norm=1.0, loss_chunk_size=4096),
        mtp_weight=MTPSection().weight,
        expert_bias_update=args.expert_bias_update,
        weights=torch.float32 if args.weights == "fp32" else torch.bfloat16,
        steps=steps,
        warmup=args.warmup,
        batch=args.batch,
        profile_steps=args.profile_steps,
    )
    del reference
    cleanup()
    active = active_matmul_params(config, mtp_depth=1)
    results.data["model"] = {
        "config": config.to_dict(),
        "total_params": sum(v.numel() for k, v in ctx.state.items() if "e_score_correction_bias" not in k),
        "active_matmul_params_per_token": active["main"],
        "mtp_module_active_params_per_token": active["mtp"],
        "capacity": capacity,
        "weights": args.weights,
        "autocast": "bf16" if device.type == "cuda" else "off",
        "mtp_weight": ctx.mtp_weight,
        "expert_bias_update": ctx.expert_bias_update,
    }
    results.save()

    # In fp32 (TF32 off) both implementations agree to rounding on either device. Under bf16 autocast they do
    # not, and should not: a random-init router's scores sit near ties, and bf16 rounding flips experts (measured
    # 15% relative hidden-state difference on the H100 with a 7e-5 loss difference).
    torch.backends.cuda.matmul.allow_tf32 = False
    tolerance = {"loss": 1e-5, "hidden": 1e-4}
    if args.only and any(name.startswith("transformers") for name in args.only):
        results.only = [*args.only, "parity_step0"]  # transformers is timed only after the parity check
    parity = results.section("parity_step0", 30, lambda: step0_parity(ctx, tolerance))
    if parity is not None and not parity["agree"]:
        raise SystemExit(f"step-0 parity with transformers failed: {parity}")
    if parity is None:  # not asked for, or transformers' model could not run here (recorded)
        print("parity_step0 did not run: transformers is not timed", flush=True)

    run = results.section
    ours = run("posttrain", 40, lambda: train_run(ctx, lambda: build_posttrain(ctx, 0, ctx.weights), 0, True))
    theirs = None
    if parity is not None:
        theirs = run(
            "transformers", 60, lambda: train_run(ctx, lambda: build_transformers(ctx, ctx.weights), 0)
        )
    fp8 = run("posttrain_fp8", 40, lambda: train_run(ctx, lambda: build_posttrain_fp8(ctx), 0, True))
    run("posttrain_mtp", 40, lambda: train_run(ctx, lambda: build_posttrain(ctx, 1, ctx.weights), 1))
    if (
        ctx.weights != torch.bfloat16
    ):  # both with bf16 weights: bf16 grouped GEMMs in both MoE implementations
        bf16 = torch.bfloat16
        run("posttrain_bf16", 40, lambda: train_run(ctx, lambda: build_posttrain(ctx, 0, bf16), 0))
        if parity is not None:
            run("transformers_bf16", 60, lambda: train_run(ctx, lambda: build_transformers(ctx, bf16), 0))

    if ours is not None and theirs is not None:
        results.data["speedup"] = {"tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"]}
        results.data["loss_agreement"] = {
            "posttrain_vs_transformers_main_loss": compare_losses(ours["main_losses"], theirs["main_losses"]),
            "posttrain": [round(x, 5) for x in ours["main_losses"][:10]],
            "transformers": [round(x, 5) for x in theirs["main_losses"][:10]],
        }
    if ours is not None and fp8 is not None:
        results.data["fp8_speedup"] = {
            "tokens_per_s_ratio": fp8["tokens_per_s"] / ours["tokens_per_s"],
            "main_loss": compare_losses(fp8["main_losses"], ours["main_losses"]),
        }
    results.save()
    text = markdown(results.data).replace("# SFT step benchmark", "# MoE SFT step benchmark", 1)
    (Path(args.out) / "moe_gpu.md").write_text(text)
    print(text, flush=True)
    return results.data


if __name__ == "__main__":
    main()
