"""SFT training step on one GPU: posttrain with its fast paths vs TRL's SFTTrainer at its best, same model, data
and order.

Model: a Llama-3.2-1B-shaped config (16 layers, d 2048, GQA 32/8 heads, SwiGLU 8192, vocab 128256, tied head),
random init, fp32 master weights, bf16 autocast, fused AdamW, constant lr, clip 1.0. Data: samples with
log-normal lengths (median 600 tokens, capped at the 4096 pack), packed by TRL's best-fit-decreasing; both
trainers consume the same packs in the same order (TRL's sampler is made sequential), so their per-step losses
must agree. posttrain's step is built from its pieces: PackedDataset, shifted_targets, the loss, and the
fast-path switches of posttrain.fast (attention over packed samples, the chunked or fused loss, compiled blocks,
FP8 linear layers, activation checkpointing).

TRL's side (bench/sft_gpu_trl.py) runs with the same varlen attention kernel (what flash-attention gives a TRL
user), with and without Liger's kernels and `torch_compile`; "TRL's best" is the fastest of those variants, and
the speed-up is posttrain's fastest over it. The older baselines (TRL with sdpa over a dense packed mask) stay
available under --only.

Reported per variant: tokens/s (real tokens, no padding), MFU (model FLOPs incl. causal attention within each
sample, over Hopper's 989 TFLOP/s dense bf16 peak and over the 770 TFLOP/s measured GEMM ceiling), peak
memory, the loss curve; plus micro-benchmarks of the loss and attention kernels (bench/sft_gpu_kernels.py) and a
torch.profiler split of GPU time (bench/gpu_harness.py): by kernel name ("share") and by where each kernel was
launched from ("split", "by_phase_ms_per_step": GEMMs, attention, the loss's other kernels, the optimiser and
gradient clipping, inductor's fused kernels, eager element-wise kernels, other), with GEMM and attention
TFLOP/s derived from it. The profiled steps come after the timed ones (compiled and warm).

    python bench/sft_gpu.py --out runs/bench_sft --batch 2        # the default sections, 2 packs per step
    python bench/sft_gpu.py --out runs/bench_sft8 --batch 8       # 8 packs per step
    python bench/sft_gpu.py --tiny --device cpu --steps 3         # smoke test of every code path

Every section runs under a global time limit (--time-limit) and writes results as it goes (sft_gpu.json,
sft_gpu.md under --out): a section that does not fit is recorded as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _load_bench_module(name: str) -> Any:
    """A bench/ module by path (bench/ on sys.path would let bench/sandbox.py shadow the `sandbox` package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_load_bench_module("gpu_harness")
from gpu_harness import (  # noqa: E402, F401 (the harness; names re-exported to moe_gpu, grpo_gpu, sft_scaling)
    GEMM_CEILING_TFLOPS,
    H100_PEAK_TFLOPS,
    KERNEL_KINDS,
    LLAMA_1B,
    ROOT,
    TINY,
    Results,
    batch_tensors,
    build_model,
    check_no_liger_patch,
    cleanup,
    compare_losses,
    compiled_graphs,
    environment,
    make_adamw,
    matmul_params,
    peak_gib,
    start_profiler,
    stop_profiler,
    sync,
    throughput,
    training_flops,
)

_load_bench_module("sft_gpu_trl")
_load_bench_module("sft_gpu_kernels")
from sft_gpu_kernels import bench_attention, bench_losses  # noqa: E402
from sft_gpu_trl import run_trl  # noqa: E402

from posttrain.algorithms.sft import shifted_targets, token_cross_entropy_sum  # noqa: E402
from posttrain.data.packing import PackedDataset, PackPlan, TokenizedSamples, plan_packs  # noqa: E402
from posttrain.fast.attention import VARLEN_ATTENTION, packed_attention_kwargs, register_varlen_attention  # noqa: E402
from posttrain.fast.backbone import compile_decoder_layers, decoder_layers, hidden_states_and_head  # noqa: E402
from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum  # noqa: E402
from posttrain.model.fp8_linear import convert_to_fp8, refresh_quantized_weights_before  # noqa: E402
from posttrain.policy import Policy  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Data: log-normal lengths, learnable tokens, TRL's BFD packs in TRL's order
# ----------------------------------------------------------------------------------------------------------------


def make_samples(n: int, capacity: int, vocab: int, seed: int) -> list[np.ndarray]:
    """Samples whose next token is mostly (previous + stride) mod V, a stride fixed per sample: learnable in
    context, so the loss falls visibly within a few steps; 30% of tokens are Zipf noise."""
    rng = np.random.default_rng(seed)
    median = 600 * capacity / 4096
    lengths = np.clip(np.round(rng.lognormal(math.log(median), 1.0, n)), 16, capacity).astype(np.int64)
    samples = []
    for length in lengths:
        stride = int(rng.integers(1, 64))
        walk = (int(rng.integers(3, vocab)) + stride * np.arange(length)) % (vocab - 3) + 3
        noise = np.minimum(rng.zipf(1.2, length), vocab - 4) + 3
        samples.append(np.where(rng.random(length) < 0.3, noise, walk).astype(np.int64))
    return samples


@dataclass
class Packs:
    """Packs in training order: each is the list of its samples (token arrays)."""

    capacity: int
    packs: list[list[np.ndarray]]
    source: str
    notes: dict[str, Any] = field(default_factory=dict)

    def dataset(self, pad_id: int) -> PackedDataset:
        """posttrain's PackedDataset over exactly these packs."""
        flat = [sample for pack in self.packs for sample in pack]
        offsets = np.zeros(len(flat) + 1, np.int64)
        np.cumsum([len(s) for s in flat], out=offsets[1:])
        tokens = np.concatenate(flat)
        samples = TokenizedSamples(tokens, np.ones(tokens.size, bool), offsets)
        bin_offsets = np.zeros(len(self.packs) + 1, np.int64)
        np.cumsum([len(p) for p in self.packs], out=bin_offsets[1:])
        plan = PackPlan(bin_offsets, np.arange(len(flat), dtype=np.int64), self.capacity, int(tokens.size))
        return PackedDataset(samples, plan, pad_id)

    def lengths(self, ids: range) -> list[int]:
        return [len(s) for i in ids for s in self.packs[i]]


def pack_like_trl(samples: list[np.ndarray], capacity: int) -> Packs:
    """TRL's BFD packing (trl.data_utils.pack_dataset, as SFTTrainer calls it); posttrain's plan on the side."""
    lengths = np.array([len(s) for s in samples])
    start = time.perf_counter()
    plan = plan_packs(lengths, capacity)
    notes: dict[str, Any] = {
        "samples": len(samples),
        "tokens": int(lengths.sum()),
        "posttrain_plan_s": time.perf_counter() - start,
        "posttrain_bins": plan.n_bins,
        "posttrain_efficiency": plan.efficiency,
    }
    try:
        from datasets import Dataset
        from trl.data_utils import pack_dataset
    except ImportError as error:
        notes["trl_packing"] = f"unavailable ({error}); posttrain's plan is used"
        packs = [[samples[i] for i in plan.bin(b)] for b in range(plan.n_bins)]
        return Packs(capacity, packs, "posttrain plan_packs", notes)
    dataset = Dataset.from_dict({"input_ids": [s.tolist() for s in samples]})
    start = time.perf_counter()
    packed = pack_dataset(dataset, capacity, strategy="bfd")
    notes["trl_pack_s"] = time.perf_counter() - start
    packs = []
    for row in packed:
        ids, bounds = np.asarray(row["input_ids"], np.int64), np.cumsum([0, *row["seq_lengths"]])
        packs.append([ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    notes["trl_bins"] = len(packs)
    notes["trl_efficiency"] = notes["tokens"] / (len(packs) * capacity)
    return Packs(capacity, packs, "trl pack_dataset(bfd)", notes)


# ----------------------------------------------------------------------------------------------------------------
# posttrain's SFT step
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    attn: str = VARLEN_ATTENTION  # "sdpa" (packed mask), "flex_attention", VARLEN_ATTENTION
    loss: str = "fused"  # "plain" (full logits), "chunked", "fused" (the Triton kernel), "liger"
    compile: bool = False
    checkpointing: bool = False
    fp8: bool = False  # train.fp8: block-wise FP8 GEMMs in every linear layer but the head
    chunk_size: int = 4096


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], variant: Variant) -> torch.Tensor:
    """The trainer's loss of one micro-batch: Σ CE / N_targets, through the variant's fast paths."""
    targets = shifted_targets(batch["input_ids"], batch["loss_mask"], batch["position_ids"])
    varlen = variant.attn == VARLEN_ATTENTION
    kwargs = packed_attention_kwargs(batch["position_ids"], batch["cu_seqlens"]) if varlen else {}
    if variant.loss == "plain":
        logits = Policy(model)(batch["input_ids"], batch["position_ids"]).logits
        total, count = token_cross_entropy_sum(logits, targets)
    else:
        hidden, weight = hidden_states_and_head(model, batch["input_ids"], batch["position_ids"], **kwargs)
        total, count = chunked_token_cross_entropy_sum(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            targets.reshape(-1),
            variant.chunk_size,
            variant.loss,
        )
    return total / count


def run_posttrain(variant: Variant, ctx: dict[str, Any], profile: bool = False) -> dict[str, Any]:
    device, cfg, steps, warmup, batch_packs = (
        ctx["device"],
        ctx["cfg"],
        ctx["steps"],
        ctx["warmup"],
        ctx["batch"],
    )
    check_no_liger_patch()
    model = build_model(cfg, variant.attn, device, ctx["state"])
    if variant.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fp8_layers = len(convert_to_fp8(model)) if variant.fp8 else 0
    if variant.compile:
        compile_decoder_layers(model)
        if variant.fp8:  # as the trainers set it up (posttrain.trainers.loop)
            for layer in decoder_layers(model):
                refresh_quantized_weights_before(layer)
    optimizer = make_adamw(model, ctx["lr"])
    dataset = ctx["packs"].dataset(pad_id=0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses, data_s, timed_from = [], 0.0, None
    total_steps = steps + (ctx["profile_steps"] if profile else 0)
    profiler = None
    cleanup()
    for step in range(total_steps):
        if step == warmup:
            sync(device)
            timed_from = time.perf_counter()
            graphs_at_warmup = compiled_graphs()
        if profile and step == steps:  # after the timed steps: compiled, warm, steady
            graphs_before = compiled_graphs()
            profiler = start_profiler(device)
        start = time.perf_counter()
        batch = batch_tensors(dataset, range(step * batch_packs, (step + 1) * batch_packs), device)
        data_s += time.perf_counter() - start if step >= warmup else 0.0
        with autocast:
            loss = sft_loss(model, batch, variant)
        loss.backward()
        with torch.profiler.record_function("clip_grad_norm"):  # the profile's optimiser phase (PHASES)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step == steps - 1:
            sync(device)
            seconds = time.perf_counter() - timed_from
    result = {
        "variant": variant.__dict__,
        "losses": [float(x) for x in losses[:steps]],
        "peak_gib": peak_gib(device),
        "host_data_s_per_step": data_s / (steps - warmup),
        **throughput(
            cfg,
            [
                ctx["packs"].lengths(range(s * batch_packs, (s + 1) * batch_packs))
                for s in range(warmup, steps)
            ],
            seconds,
        ),
    }
    if variant.compile:  # recompiles for new shapes show here
        result["compiled_graphs_in_process"] = compiled_graphs()
        result["graphs_compiled_in_timed_steps"] = result["compiled_graphs_in_process"] - graphs_at_warmup
    if variant.fp8:
        result["fp8_layers"] = fp8_layers
    if profiler is not None:
        result["profile"] = stop_profiler(profiler, device, ctx["profile_steps"])
        result["profile"]["graphs_compiled_while_profiling"] = compiled_graphs() - graphs_before
        profiled = [
            ctx["packs"].lengths(range(s * batch_packs, (s + 1) * batch_packs))
            for s in range(steps, total_steps)
        ]
        result["profile"]["derived"] = profile_rates(
            cfg, profiled, result["profile"], result["seconds"], result["tokens"]
        )
    del model, optimizer
    return result


def profile_rates(
    cfg: dict[str, Any], profiled: list[list[int]], prof: dict[str, Any], timed_s: float, timed_tokens: int
) -> dict[str, float]:
    """What the profiled steps' kernel times say about the rate: GEMM TFLOP/s (6·P·tokens over the GEMM
    kernels' time), attention TFLOP/s, the timed steps' time at the profiled steps' tokens against the kernels'
    sum (GPU idle, host-bound time), and the MFU the step would reach if it were its GEMMs and attention alone."""
    steps = len(profiled)
    tokens = sum(sum(lengths) for lengths in profiled) / steps
    gemm_flops = 6.0 * matmul_params(cfg) * tokens
    model_flops = sum(training_flops(cfg, lengths) for lengths in profiled) / steps
    ms = prof.get("split_ms_per_step", {})
    gemm_ms, attention_ms = ms.get("gemm", 0.0), ms.get("attention", 0.0)
    step_ms = timed_s / timed_tokens * tokens * 1e3
    return {
        "tokens_per_profiled_step": tokens,
        "gemm_tflops": gemm_flops / gemm_ms / 1e9 if gemm_ms else 0.0,
        "attention_tflops": (model_flops - gemm_flops) / attention_ms / 1e9 if attention_ms else 0.0,
        "timed_ms_at_these_tokens": step_ms,
        "kernel_ms_per_step": prof["gpu_ms_per_step"],
        "step_minus_kernels_ms": step_ms - prof["gpu_ms_per_step"],
        "mfu_if_only_gemm_and_attention": (
            model_flops / (gemm_ms + attention_ms) / 1e9 / H100_PEAK_TFLOPS if gemm_ms + attention_ms else 0.0
        ),
    }


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    sections = results["sections"]
    lines = [
        f"# SFT step benchmark ({results.get('env', {}).get('gpu', results.get('env', {}).get('device'))})",
        "",
    ]
    lines.append("| run | tokens/s | model TFLOP/s | MFU (989) | MFU (770) | peak GiB | final loss |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for key, value in sections.items():
        if isinstance(value, dict) and "tokens_per_s" in value:
            peak = value.get("peak_gib")
            lines.append(
                f"| {key} | {value['tokens_per_s']:,.0f} | {value['model_tflops']:.1f} | "
                f"{100 * value['mfu_vs_989']:.1f}% | {100 * value['mfu_vs_770']:.1f}% | "
                f"{'-' if peak is None else f'{peak:.1f}'} | {value['losses'][-1]:.4f} |"
            )
        elif isinstance(value, dict) and ("skipped" in value or "error" in value):
            lines.append(f"| {key} | {value.get('skipped') or value.get('error', '')[:80]} | | | | | |")
    for key in ("speedup", "fp8_speedup", "loss_agreement"):
        if key in results:
            lines += ["", f"**{key}**: `{json.dumps(results[key])}`"]
    curves = {k: v["losses"] for k, v in sections.items() if isinstance(v, dict) and v.get("losses")}
    if curves:
        lines += ["", "| step | " + " | ".join(curves) + " |", "|" + " --- |" * (len(curves) + 1)]
        for step in range(max(map(len, curves.values()))):
            cells = [f"{c[step]:.4f}" if step < len(c) else "" for c in curves.values()]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    for key, value in sections.items():
        if isinstance(value, dict) and "profile" in value:
            prof = value["profile"]
            lines += [
                "",
                f"profile {key}: `{json.dumps(prof['share'])}` ({prof['gpu_ms_per_step']:.1f} ms GPU per step)",
            ]
            if "split_ms_per_step" in prof:
                lines += [
                    "",
                    f"split {key}, ms per step: `{json.dumps(prof['split_ms_per_step'])}`; by phase: "
                    f"`{json.dumps(prof['by_phase_ms_per_step'])}`",
                ]
            if prof.get("timeline"):
                lines += ["", f"GPU timeline {key}: `{json.dumps(prof['timeline'])}`"]
            if "derived" in prof:
                lines += [
                    "",
                    f"rates {key}: `{json.dumps({k: round(v, 3) for k, v in prof['derived'].items()})}`",
                ]
    return "\n".join(lines) + "\n"


# The default sections, in the order they run (--only runs its own list in its own order). TRL's are variants of
# the same trainer: "TRL's best" is the fastest of them. Liger's variants come last (see check_no_liger_patch).
DEFAULT_SECTIONS = [
    "loss_kernels",
    "posttrain_compiled_fused",
    "trl_varlen_compile",
    "posttrain_eager_fused",
    "trl_varlen",
    "posttrain_eager_fused_fp8",
    "posttrain_compiled_chunked",
    "trl_varlen_liger",  # last: TRL's use_liger_kernel patches transformers' Llama for the whole process
    "trl_varlen_liger_compile",
]


def sections(ctx: dict[str, Any]) -> dict[str, tuple[float, Any]]:
    """Every section: name -> (seconds it needs at least, what it runs). "auto" loss = the fused Triton kernel on
    CUDA, the chunked loss elsewhere (what the trainers use)."""

    # Seconds a run needs at least, measured on an H200: posttrain compiles one decoder block (~20 s), TRL's
    # torch_compile the whole model (~130 s); a step costs up to ~0.15 s per 4096-token pack.
    step_s = 0.15 * ctx["batch"] * (ctx["steps"] + ctx["profile_steps"])

    def ours(variant: Variant, profile: bool = False) -> tuple[float, Any]:
        return (40 if variant.compile else 20) + step_s, lambda: run_posttrain(variant, ctx, profile=profile)

    def trl(attn: str, profile: bool = False, **switches: bool) -> tuple[float, Any]:
        needs_s = (150 if switches.get("torch_compile") else 40) + step_s
        return needs_s, lambda: run_trl(attn, ctx, profile, **switches)

    return {
        "loss_kernels": (20, lambda: bench_losses(ctx)),
        "trl_varlen": trl(VARLEN_ATTENTION),
        "trl_varlen_compile": trl(VARLEN_ATTENTION, profile=True, torch_compile=True),
        "posttrain_compiled_fused": ours(Variant("compiled_fused", loss="auto", compile=True), profile=True),
        "posttrain_eager_fused": ours(Variant("eager_fused", loss="auto"), profile=True),
        "posttrain_compiled_fused_fp8": ours(
            Variant("compiled_fp8", loss="auto", compile=True, fp8=True), profile=True
        ),
        "posttrain_eager_fused_fp8": ours(Variant("eager_fp8", loss="auto", fp8=True), profile=True),
        "posttrain_compiled_chunked": ours(
            Variant("compiled_chunked", loss="chunked", compile=True), profile=True
        ),
        "posttrain_eager_chunked": ours(Variant("eager_chunked", loss="chunked"), profile=True),
        "trl_varlen_liger": trl(VARLEN_ATTENTION, use_liger=True),
        "trl_varlen_liger_compile": trl(VARLEN_ATTENTION, use_liger=True, torch_compile=True),
        "attention_kernels": (40, lambda: bench_attention(ctx)),
        # the earlier baselines and variants
        "trl_sdpa": trl("sdpa"),
        "trl_sdpa_liger": trl("sdpa", use_liger=True),
        "posttrain_plain_sdpa": ours(Variant("plain", "sdpa", "plain")),
        "posttrain_sdpa_chunked": ours(Variant("sdpa_chunked", attn="sdpa", loss="chunked")),
        "posttrain_varlen_liger": ours(Variant("liger", loss="liger")),
        "posttrain_varlen_checkpointing": ours(Variant("ckpt", loss="auto", checkpointing=True)),
        "posttrain_flex_chunked": (60, lambda: run_posttrain(Variant("flex", attn="flex_attention"), ctx)),
        "trl_flex": (60, lambda: run_trl("flex_attention", ctx)),
    }


def end_loss_gap(fp8_losses: list[float], bf16_losses: list[float]) -> dict[str, float]:
    """FP8 against bf16 at the end of training, on the same packs: the mean loss over the last tenth of the steps
    (at least 5; one step's loss is one batch's, noisy), and its relative difference (V3's bound: 0.25%)."""
    steps = min(len(fp8_losses), len(bf16_losses))
    last = max(5, steps // 10)
    fp8_end = float(np.mean(fp8_losses[steps - last : steps]))
    bf16_end = float(np.mean(bf16_losses[steps - last : steps]))
    return {
        "steps": steps,
        "last_steps": last,
        "fp8": fp8_end,
        "bf16": bf16_end,
        "rel_diff": fp8_end / bf16_end - 1,
    }


def summarise(data: dict[str, Any]) -> None:
    """The speed-ups: posttrain's fastest bf16 run over TRL's fastest variant, FP8 over posttrain's fastest bf16;
    every run's losses against TRL's with the varlen kernel (eager) or the first TRL run there is."""
    timed = {k: v for k, v in data["sections"].items() if isinstance(v, dict) and "tokens_per_s" in v}
    ours = {k: v for k, v in timed.items() if k.startswith("posttrain") and "fp8" not in k}
    fp8 = {k: v for k, v in timed.items() if k.startswith("posttrain") and "fp8" in k}
    theirs = {k: v for k, v in timed.items() if k.startswith("trl")}

    def best(runs: dict[str, Any]) -> str:
        return max(runs, key=lambda k: runs[k]["tokens_per_s"])

    if ours and theirs:
        data["speedup"] = {
            "posttrain_best": best(ours),
            "trl_best": best(theirs),
            "trl_variants": {k: round(v["tokens_per_s"]) for k, v in theirs.items()},
            "tokens_per_s_ratio": ours[best(ours)]["tokens_per_s"] / theirs[best(theirs)]["tokens_per_s"],
        }
    if ours and fp8:
        data["fp8_speedup"] = {
            "fp8_best": best(fp8),
            "bf16_best": best(ours),
            "tokens_per_s_ratio": fp8[best(fp8)]["tokens_per_s"] / ours[best(ours)]["tokens_per_s"],
            "end_loss": end_loss_gap(fp8[best(fp8)]["losses"], ours[best(ours)]["losses"]),
        }
    reference = "trl_varlen" if "trl_varlen" in theirs else next(iter(theirs), None)
    if reference is not None:
        agreement = {
            k: compare_losses(v["losses"], timed[reference]["losses"])
            for k, v in timed.items()
            if k != reference
        }
        tolerance = 2e-2
        data["loss_agreement"] = {
            "vs": reference,
            "tolerance_rel": tolerance,
            "all_agree": all((a["max_rel_diff"] or 0) <= tolerance for a in agreement.values()),
            "per_run": agreement,
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short packs (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--steps", type=int, default=30, help="optimiser steps per run (the first --warmup untimed)"
    )
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps (compilation, both sides)")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="packs per optimiser step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds for the whole script")
    parser.add_argument("--only", nargs="*", help="run only these sections (names as in the results)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/bench_sft"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cfg = TINY if args.tiny else LLAMA_1B
    capacity = 256 if args.tiny else 4096
    results = Results(Path(args.out), "sft_gpu", args.time_limit, args.only)
    results.data["env"] = environment(device)
    results.data["command"] = " ".join(
        [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
    )
    register_varlen_attention()

    n_packs = args.batch * (args.steps + args.profile_steps)
    samples = make_samples(
        int(n_packs * capacity / (700 * capacity / 4096)) + 40, capacity, cfg["vocab_size"], 0
    )
    packs = results.section("packing", 5, lambda: pack_like_trl(samples, capacity))
    if packs is None or len(packs.packs) < n_packs:
        raise SystemExit(f"not enough packs ({0 if packs is None else len(packs.packs)} < {n_packs})")
    results.data["sections"]["packing"] = {**packs.notes, "source": packs.source}
    torch.manual_seed(0)
    state = {
        k: v.detach().cpu().clone() for k, v in build_model(cfg, "sdpa", device, None).state_dict().items()
    }
    cleanup()
    ctx = {
        "device": device,
        "samples": samples,
        "cfg": cfg,
        "state": state,
        "packs": packs,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch": args.batch,
        "lr": args.lr,
        "profile_steps": args.profile_steps,
    }
    results.data["model"] = {"config": cfg, "matmul_params": matmul_params(cfg), "capacity": capacity}

    plan = sections(ctx)
    chosen = args.only or DEFAULT_SECTIONS
    unknown = sorted(set(chosen) - set(plan) - {"packing"})
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; known: {sorted(plan)}")
    results.only = list(chosen)
    for key in [k for k in chosen if k in plan]:  # in the order asked; late ones are skipped near the limit
        needs_s, fn = plan[key]
        results.section(key, needs_s, fn)
    summarise(results.data)
    results.save()
    text = markdown(results.data)
    (Path(args.out) / "sft_gpu.md").write_text(text)
    print(text, flush=True)
    return results.data


if __name__ == "__main__":
    main()
