"""SFT training step on one GPU: posttrain with its fast paths vs TRL's SFTTrainer, same model, data and order.

Model: a Llama-3.2-1B-shaped config (16 layers, d 2048, GQA 32/8 heads, SwiGLU 8192, vocab 128256, tied head),
random init, fp32 master weights, bf16 autocast, fused AdamW, constant lr, clip 1.0. Data: samples with
log-normal lengths (median 600 tokens, capped at the 4096 pack), packed by TRL's best-fit-decreasing; both
trainers consume the same packs in the same order (TRL's sampler is made sequential), so their per-step losses
must agree. posttrain's step is built from its pieces: PackedDataset, shifted_targets, the loss, and the
fast-path switches of posttrain.fast (attention over packed samples, chunked loss, compiled blocks,
activation checkpointing).

Reported per variant: tokens/s (real tokens, no padding), MFU (model FLOPs incl. causal attention within each
sample, over the H100's 989 TFLOP/s dense bf16 peak and over the 770 TFLOP/s measured GEMM ceiling), peak
memory, the loss curve; plus micro-benchmarks of the loss and attention kernels and a torch.profiler split of
GPU time (attention, GEMM, loss, optimizer, other) and host data time. The profiled steps come after the timed
ones (compiled and warm); besides the split by kernel name ("share") the profile splits kernel time by where each
kernel was launched from ("split", "by_phase_ms_per_step": GEMMs, attention, the loss's other kernels, the
optimiser and gradient clipping, inductor's fused kernels, eager element-wise kernels, other) and derives GEMM
and attention TFLOP/s from it.

    python bench/sft_gpu.py --out runs/bench_sft                 # H100, ~4 min
    python bench/sft_gpu.py --tiny --device cpu --steps 3        # smoke test of every code path
    python bench/sft_gpu.py --batch 8 --warmup 8 --steps 24 --only packing posttrain_varlen_chunked_compiled

Every section runs under a global time limit (--time-limit) and writes results as it goes (sft_gpu.json,
sft_gpu.md under --out): a section that does not fit is recorded as skipped.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posttrain.algorithms.sft import shifted_targets, token_cross_entropy_sum  # noqa: E402
from posttrain.data.packing import PackedDataset, PackPlan, TokenizedSamples, plan_packs  # noqa: E402
from posttrain.fast.attention import VARLEN_ATTENTION, packed_attention_kwargs, register_varlen_attention  # noqa: E402
from posttrain.fast.backbone import compile_decoder_layers, hidden_states_and_head  # noqa: E402
from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum  # noqa: E402
from posttrain.policy import Policy  # noqa: E402

H100_PEAK_TFLOPS = 989.0  # dense bf16, datasheet
GEMM_CEILING_TFLOPS = 770.0  # bf16 8192³ measured on this H100 (shared/ANCHORS.md)

LLAMA_1B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 2,
    "bos_token_id": 1,
}
TINY = {
    **LLAMA_1B,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
}


# ----------------------------------------------------------------------------------------------------------------
# Harness: time limit, results, timing
# ----------------------------------------------------------------------------------------------------------------


class Results:
    """Results written to <out>/<name>.json after every section, so a killed run still leaves them."""

    def __init__(self, out: Path, name: str, time_limit: float, only: list[str] | None = None) -> None:
        self.out, self.name, self.only = out, name, only
        self.deadline = time.monotonic() + time_limit
        self.data: dict[str, Any] = {"sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, key: str, needs_s: float, fn: Callable[[], Any]) -> Any:
        if self.only and key not in self.only and key != "packing":
            return None
        if self.left() < needs_s:
            self.data["sections"][key] = {"skipped": f"{self.left():.0f} s left, needs ~{needs_s:.0f} s"}
            print(f"[{key}] skipped: {self.data['sections'][key]['skipped']}", flush=True)
            self.save()
            return None
        start = time.monotonic()
        print(f"[{key}] start ({self.left():.0f} s left)", flush=True)
        try:
            value = fn()
            record = value if isinstance(value, dict) else {"value": value}
        except Exception as error:  # a failed section must not cost the others
            value = None
            record = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-3000:]}
            print(record["trace"], flush=True)
        record = {**record, "section_s": round(time.monotonic() - start, 1)}
        self.data["sections"][key] = record
        self.save()
        cleanup()
        return value

    def save(self) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(self.data, indent=1, default=str))


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_initialized():  # a process that never used the GPU (a launcher) keeps no context on it
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], device: torch.device, iters: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)}
    for name in ("trl", "liger-kernel", "datasets", "triton"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "missing"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------


def matmul_params(cfg: dict[str, Any]) -> int:
    """Weights multiplied once per token: attention and MLP projections of every layer, and the output head."""
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * cfg["intermediate_size"]
    return cfg["num_hidden_layers"] * per_layer + cfg["vocab_size"] * d


def training_flops(cfg: dict[str, Any], sample_lengths: list[int]) -> float:
    """6·P·tokens for the projections, plus causal attention within each sample (QKᵀ and PV; backward = 2×):
    per layer and sample 3 · 2 matmuls · 2 FLOPs · H·hd · n(n+1)/2."""
    tokens = sum(sample_lengths)
    width = cfg["num_attention_heads"] * cfg["head_dim"]
    attention = 12 * cfg["num_hidden_layers"] * width * sum(n * (n + 1) / 2 for n in sample_lengths)
    return 6.0 * matmul_params(cfg) * tokens + attention


def throughput(cfg: dict[str, Any], step_lengths: list[list[int]], seconds: float) -> dict[str, float]:
    tokens = sum(sum(lengths) for lengths in step_lengths)
    flops = sum(training_flops(cfg, lengths) for lengths in step_lengths)
    tflops = flops / seconds / 1e12
    return {
        "tokens_per_s": tokens / seconds,
        "model_tflops": tflops,
        "mfu_vs_989": tflops / H100_PEAK_TFLOPS,
        "mfu_vs_770": tflops / GEMM_CEILING_TFLOPS,
        "seconds": seconds,
        "tokens": tokens,
    }


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


def batch_tensors(dataset: PackedDataset, ids: range, device: torch.device) -> dict[str, torch.Tensor]:
    packs = [dataset[i] for i in ids]
    return {
        k: torch.stack([p[k] for p in packs]).to(device, non_blocking=True)
        for k in ("input_ids", "position_ids", "loss_mask")
    }


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def build_model(cfg: dict[str, Any], attn: str, device: torch.device, state: dict | None) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    model.config.use_cache = False
    return model.train()


def make_adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """What both trainers use: fused AdamW (CUDA), no weight decay, betas (0.9, 0.999), eps 1e-8."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        fused=model.device.type == "cuda",
    )


# ----------------------------------------------------------------------------------------------------------------
# posttrain's SFT step
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    attn: str = VARLEN_ATTENTION  # "sdpa" (packed mask), "flex_attention", VARLEN_ATTENTION
    loss: str = "chunked"  # "plain" (full logits, the current trainer), "chunked", "liger"
    compile: bool = False
    checkpointing: bool = False
    chunk_size: int = 4096


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], variant: Variant) -> torch.Tensor:
    """The trainer's loss of one micro-batch: Σ CE / N_targets, through the variant's fast paths."""
    targets = shifted_targets(batch["input_ids"], batch["loss_mask"], batch["position_ids"])
    kwargs = packed_attention_kwargs(batch["position_ids"]) if variant.attn == VARLEN_ATTENTION else {}
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
    model = build_model(cfg, variant.attn, device, ctx["state"])
    if variant.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant.compile:
        compile_decoder_layers(model)
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
        if profile and step == steps:  # after the timed steps: compiled, warm, steady
            graphs_before = _compiled_graphs()
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
    if variant.compile:
        result["compiled_graphs_in_process"] = _compiled_graphs()  # recompiles for new shapes show here
    if profiler is not None:
        result["profile"] = stop_profiler(profiler, device, ctx["profile_steps"])
        result["profile"]["graphs_compiled_while_profiling"] = _compiled_graphs() - graphs_before
        profiled = [
            ctx["packs"].lengths(range(s * batch_packs, (s + 1) * batch_packs))
            for s in range(steps, total_steps)
        ]
        result["profile"]["derived"] = profile_rates(
            cfg, profiled, result["profile"], result["seconds"], result["tokens"]
        )
    del model, optimizer
    return result


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (0 without compiled code)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
# TRL's SFTTrainer on the same model, packs and order
# ----------------------------------------------------------------------------------------------------------------


def run_trl(attn: str, ctx: dict[str, Any], profile: bool = False, use_liger: bool = False) -> dict[str, Any]:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    device, steps, warmup = ctx["device"], ctx["steps"], ctx["warmup"]
    total_steps = steps + (ctx["profile_steps"] if profile else 0)

    class InOrder(SFTTrainer):
        """Packs in dataset order, as posttrain reads them (TRL's own sampler would shuffle them)."""

        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    marks: dict[str, Any] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == warmup:
                sync(device)
                marks["from"] = time.perf_counter()
            if state.global_step == steps:
                sync(device)
                marks["to"] = time.perf_counter()
                if profile:
                    marks["profiler"] = start_profiler(device)

    samples = [
        s.tolist() for pack in ctx["packs"].packs for s in pack
    ]  # TRL re-packs them into the same bins
    model = build_model(ctx["cfg"], attn, device, ctx["state"])
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "data" / "tokenizer"))
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            max_steps=total_steps,
            per_device_train_batch_size=ctx["batch"],
            gradient_accumulation_steps=1,
            learning_rate=ctx["lr"],
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
            bf16=device.type == "cuda",
            use_cpu=device.type != "cuda",
            packing=True,
            packing_strategy="bfd",
            padding_free=True,
            max_length=ctx["packs"].capacity,
            gradient_checkpointing=False,
            use_liger_kernel=use_liger,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = InOrder(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": samples}),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        same_packs = [list(map(len, p)) for p in ctx["packs"].packs] == [
            list(r) for r in trainer.train_dataset["seq_lengths"]
        ]
        cleanup()
        trainer.train()
        if profile:
            sync(device)
            prof = stop_profiler(marks["profiler"], device, ctx["profile_steps"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:steps]
    result = {
        "attn_implementation": attn,
        "use_liger_kernel": use_liger,
        "same_packs_as_posttrain": same_packs,
        "losses": losses,
        "peak_gib": peak_gib(device),
        **throughput(
            ctx["cfg"],
            [
                ctx["packs"].lengths(range(s * ctx["batch"], (s + 1) * ctx["batch"]))
                for s in range(warmup, steps)
            ],
            marks["to"] - marks["from"],
        ),
    }
    if profile:
        result["profile"] = prof
    del trainer, model
    return result


# ----------------------------------------------------------------------------------------------------------------
# Profiler: GPU time by kind of kernel
# ----------------------------------------------------------------------------------------------------------------

KERNEL_KINDS = [
    # Inductor's kernels of compiled blocks (pointwise, reductions): the fused element-wise work
    ("compiled_fused", re.compile(r"^triton_(poi|red|per)_")),
    ("attention", re.compile(r"flash|fmha|attention|attn|flex|triton_tem_fused", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|_amp_|norm_kernel|clip", re.I)),
    (
        "loss",
        # exp_kernel: the chunked loss's softmax backward, exp(log p) over [chunk, vocab]; nothing else here
        # takes exp of a large tensor (SiLU has kernels of its own)
        re.compile(
            r"cross_entropy|log_softmax|softmax|logsumexp|nll|liger|scatter_gather|gather|exp_kernel", re.I
        ),
    ),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|cublas|matmul|wgmma", re.I)),
]


def start_profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


# The split by where a kernel was launched from, then by its name. A kernel's phase is that of the nearest CPU
# range above the op that launched it: the optimiser (torch's "Optimizer.step#…"/"Optimizer.zero_grad#…" ranges,
# the step's "clip_grad_norm" range), the loss (the chunked loss's autograd Function and its backward node,
# Liger's, aten's cross_entropy/log_softmax/nll_loss), else the model (embedding, blocks, final norm).
PHASES = [
    ("optimizer", re.compile(r"^Optimizer\.|clip_grad_norm")),
    ("loss", re.compile(r"CrossEntropy|cross_entropy|log_softmax|LogSoftmax|nll_loss|NllLoss")),
]
# Kinds of kernel, first match wins: GEMMs of the loss's head count as GEMMs, its other kernels as "loss".
SPLIT_KINDS = [
    ("compiled_fused", re.compile(r"triton_(poi|red|per)_")),  # inductor's fused kernels of compiled blocks
    ("gemm", re.compile(r"triton_tem_fused_\w*mm")),  # inductor GEMM templates (max-autotune only)
    ("attention", re.compile(r"flash|fmha|attention|attn|flex|sdpa|triton_tem_fused", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|cublas|matmul|wgmma|aten::(add|b)?mm\b", re.I)),
    ("loss", re.compile(r"cross_entropy|log_softmax|softmax|logsumexp|nll|liger", re.I)),
    (
        "elementwise",  # eager ATen element-wise, reduction, copy, index and cat kernels (names on CUDA and CPU)
        re.compile(r"elementwise|reduce_kernel|CatArray|index|scatter|gather|fill|copy|aten::", re.I),
    ),
]
SPLIT_ORDER = ["gemm", "attention", "loss", "optimizer", "compiled_fused", "elementwise", "other"]
# Driver/runtime API calls (cudaLaunchKernel, cuLaunchKernelEx) and the profiler's "Command Buffer Full" marks (a
# launch waiting for room in the GPU's queue): not ops, never the phase of a kernel (their ids are CUPTI's and can
# match other ops' kernels).
_RUNTIME_CALL = re.compile(r"^cu[A-Z]|^cuda[A-Z]|^Command Buffer Full")
# Ranges (CPU and their GPU-side twins), not kernels: counted through the kernels inside them.
_RANGES = ("Optimizer.", "ProfilerStep", "clip_grad_norm")


def _phase(event: Any, cache: dict[int, str]) -> str:
    """The phase of the nearest enclosing CPU range that names one (PHASES), else "model"."""
    chain, found = [], "model"
    while event is not None:
        if id(event) in cache:
            found = cache[id(event)]
            break
        chain.append(event)
        name = next((p for p, pattern in PHASES if pattern.search(event.name)), None)
        if name is not None:
            found = name
            break
        event = event.cpu_parent
    for seen in chain:
        cache[id(seen)] = found
    return found


def _split_kind(name: str, phase: str) -> str:
    if phase == "optimizer" or re.search(r"adam|multi_tensor|foreach|_amp_", name, re.I):
        return "optimizer"
    kind = next((k for k, pattern in SPLIT_KINDS if pattern.search(name)), "other")
    return "loss" if phase == "loss" and kind not in ("gemm", "attention") else kind


def phase_split(prof: Any, device: torch.device, steps: int) -> dict[str, Any]:
    """Kernel time per kind and per phase (see PHASES and SPLIT_KINDS), ms per step. On CUDA each kernel counts in
    the phase of the op that launched it (the kernels the profiler links to each CPU op, as for its "Self CUDA"
    column); kernel time it links to no op counts as "unlinked", by name alone. On CPU, ops' self CPU time stands
    in for kernels."""
    events = prof.events()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    annotations = {e.name for e in events if getattr(e, "is_user_annotation", False)}

    def is_range(name: str) -> bool:
        return name in annotations or name.startswith(_RANGES)

    cache: dict[int, str] = {}
    by_phase: dict[str, dict[str, float]] = {}
    # (phase, launching op, kernel) -> µs: what each phase holds, for the report's top entries
    launched: dict[tuple[str, str, str], float] = {}

    def add(phase: str, name: str, micros: float, op: str = "") -> None:
        cell = by_phase.setdefault(phase, {})
        kind = _split_kind(name, phase)
        cell[kind] = cell.get(kind, 0.0) + micros
        launched[phase, op, name] = launched.get((phase, op, name), 0.0) + micros

    linked_us = total_us = excess_us = 0.0
    if device.type == "cuda":
        on_device: dict[str, float] = {}
        for event in events:
            if event.device_type == cuda and not is_range(event.name):
                on_device[event.name] = on_device.get(event.name, 0.0) + event.time_range.elapsed_us()
        pairs: list[tuple[str, str, str, float]] = []
        linked: dict[str, float] = {}
        for event in events:
            if event.device_type != cpu or _RUNTIME_CALL.match(event.name) or not event.kernels:
                continue
            phase = _phase(event, cache)
            for kernel in event.kernels:
                if not is_range(kernel.name):
                    pairs.append((phase, event.name, kernel.name, kernel.duration))
                    linked[kernel.name] = linked.get(kernel.name, 0.0) + kernel.duration
        # A kernel linked to more than one op (the profiler matches by correlation id) would count twice: each
        # kernel name's linked time is scaled to its time on the device, and the excess reported.
        for phase, op, name, micros in pairs:
            add(phase, name, micros * min(1.0, on_device.get(name, 0.0) / linked[name]), op)
        for name, micros in on_device.items():
            if micros > linked.get(name, 0.0):
                add("unlinked", name, micros - linked.get(name, 0.0))
        total_us = sum(on_device.values())
        linked_us = sum(min(v, on_device.get(k, 0.0)) for k, v in linked.items())
        excess_us = sum(max(0.0, v - on_device.get(k, 0.0)) for k, v in linked.items())
    else:
        for event in events:
            if event.device_type == cpu and not _RUNTIME_CALL.match(event.name) and not is_range(event.name):
                add(_phase(event, cache), event.name, event.self_cpu_time_total, event.name)
    top_launched: dict[str, list[str]] = {}
    for (phase, op, name), micros in sorted(launched.items(), key=lambda kv: -kv[1]):
        if len(top_launched.setdefault(phase, [])) < 8:
            top_launched[phase].append(f"{micros / 1e3 / steps:.2f} ms {op[:40]} -> {name[:70]}")
    kinds = {k: sum(cell.get(k, 0.0) for cell in by_phase.values()) for k in SPLIT_ORDER}
    total = sum(kinds.values()) or 1.0
    return {
        "split": {k: round(v / total, 4) for k, v in kinds.items()},
        "split_ms_per_step": {k: round(v / 1e3 / steps, 3) for k, v in kinds.items()},
        "by_phase_ms_per_step": {
            phase: {k: round(v / 1e3 / steps, 3) for k, v in sorted(cell.items(), key=lambda kv: -kv[1])}
            for phase, cell in sorted(by_phase.items())
        },
        "linked_to_ops": round(linked_us / total_us, 4) if total_us else None,
        "linked_twice_ms_per_step": round(excess_us / 1e3 / steps, 3),
        "top_by_phase": top_launched,
    }


def stop_profiler(
    prof: Any, device: torch.device, steps: int, kinds: list[tuple[str, re.Pattern]] = KERNEL_KINDS
) -> dict[str, Any]:
    """Self GPU time per kind of kernel (the first of `kinds` whose pattern matches its name; CPU time on a CPU
    run), per step: "share". Then "split": the same time by kind and by phase (phase_split), which also tells
    the loss's and the optimiser's element-wise kernels from the model's."""
    sync(device)
    prof.stop()
    totals: dict[str, float] = {kind: 0.0 for kind, _ in kinds} | {"other": 0.0}
    top: dict[str, float] = {}
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False) or event.key.startswith(_RANGES):
            continue  # ranges around kernels (e.g. "Optimizer.step#AdamW.step"), not kernels: no double count
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            micros = event.self_cpu_time_total
        kind = next((k for k, pattern in kinds if pattern.search(event.key)), "other")
        totals[kind] += micros
        top[event.key[:100]] = micros
    total = sum(totals.values()) or 1.0
    result = {
        "gpu_ms_per_step": total / 1e3 / steps,
        "share": {k: round(v / total, 4) for k, v in totals.items()},
        "top_kernels_ms_per_step": {
            k: round(v / 1e3 / steps, 3) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:20]
        },
    }
    try:
        result |= phase_split(prof, device, steps)
    except Exception as error:  # noqa: BLE001 (the name-based share stands without it)
        result["split_error"] = f"{type(error).__name__}: {error}"
    return result


# ----------------------------------------------------------------------------------------------------------------
# Micro-benchmarks: the loss through the head, and attention over one packed micro-batch
# ----------------------------------------------------------------------------------------------------------------


def bench_losses(ctx: dict[str, Any]) -> dict[str, Any]:
    device, cfg = ctx["device"], ctx["cfg"]
    n = ctx["batch"] * ctx["packs"].capacity
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(n, cfg["hidden_size"], device=device, generator=g).requires_grad_()
    weight = (
        torch.randn(cfg["vocab_size"], cfg["hidden_size"], device=device, generator=g) * 0.02
    ).requires_grad_()
    targets = torch.randint(0, cfg["vocab_size"], (n,), device=device, generator=g)
    targets[::50] = -100
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def plain() -> torch.Tensor:
        return token_cross_entropy_sum(torch.nn.functional.linear(hidden, weight), targets)[0]

    impls: dict[str, Callable[[], torch.Tensor]] = {"plain": plain}
    for chunk in (1024, 4096, 8192):
        impls[f"chunked_{chunk}"] = lambda c=chunk: chunked_token_cross_entropy_sum(
            hidden, weight, targets, c
        )[0]
    impls["liger"] = lambda: chunked_token_cross_entropy_sum(hidden, weight, targets, impl="liger")[0]
    out: dict[str, Any] = {"tokens": n}
    reference = None
    for name, fn in impls.items():

        def step(fn=fn) -> torch.Tensor:
            hidden.grad = weight.grad = None
            with autocast:
                value = fn()
            value.backward()
            return value

        try:
            cleanup()
            value = float(step().detach())
            grad = hidden.grad.float().clone()
            ms = median_ms(step, device, iters=5, warmup=2)
            reference = (value, grad) if reference is None else reference
            out[name] = {
                "fwd_bwd_ms": ms,
                "peak_gib": peak_gib(device),
                "value_rel_diff_vs_plain": abs(value - reference[0]) / abs(reference[0]),
                "grad_hidden_rel_diff_vs_plain": float((grad - reference[1]).norm() / reference[1].norm()),
            }
        except Exception as error:  # noqa: BLE001 (liger may be missing: record and go on)
            out[name] = {"error": f"{type(error).__name__}: {error}"}
    return out


def bench_attention(ctx: dict[str, Any]) -> dict[str, Any]:
    """One layer's attention, forward + backward, over the first micro-batch's packed samples."""
    from posttrain.fast.attention import cu_seqlens_from_position_ids, varlen_attention

    device, cfg = ctx["device"], ctx["cfg"]
    batch = batch_tensors(ctx["packs"].dataset(0), range(ctx["batch"]), device)
    heads, kv_heads, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    b, s = batch["input_ids"].shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(1)
    q = torch.randn(b, heads, s, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(b, kv_heads, s, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(b, kv_heads, s, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    cu_seqlens, _ = cu_seqlens_from_position_ids(batch["position_ids"])
    sample = torch.repeat_interleave(
        torch.arange(len(cu_seqlens) - 1, device=device), cu_seqlens.diff().long()
    )
    sample = sample.view(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    dense = (sample[:, :, None] == sample[:, None, :]) & causal  # [B, S, S], what sdpa's packed path builds
    kwargs = packed_attention_kwargs(batch["position_ids"])

    def sdpa_masked() -> torch.Tensor:  # as transformers' sdpa path: KV heads repeated, a boolean mask
        groups = heads // kv_heads
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=dense[:, None]
        ).transpose(1, 2)

    def varlen() -> torch.Tensor:
        return varlen_attention(None, q, k, v, None, **kwargs)[0]

    impls = {"sdpa_dense_mask": sdpa_masked, "varlen": varlen}
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def same_sample(b_, h_, q_idx, kv_idx):  # noqa: ANN001, ANN202
            return (sample[b_, q_idx] == sample[b_, kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(same_sample, b, None, s, s, device=device)
        compiled = torch.compile(flex_attention)

        def flex() -> torch.Tensor:
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

        impls["flex_attention"] = flex
    flops = 12 * heads * dim * sum(n * (n + 1) / 2 for n in cu_seqlens.diff().tolist())  # fwd + bwd, causal
    out: dict[str, Any] = {"tokens": b * s, "samples": len(cu_seqlens) - 1}
    reference = None
    grad_out = torch.randn(b, s, heads, dim, device=device, dtype=dtype, generator=g)
    for name, fn in impls.items():

        def step(fn=fn) -> torch.Tensor:
            q.grad = k.grad = v.grad = None
            result = fn()
            result.backward(grad_out)
            return result

        try:
            result = step().float()
            reference = result if reference is None else reference
            ms = median_ms(step, device, iters=5, warmup=2)
            out[name] = {
                "fwd_bwd_ms": ms,
                "tflops": flops / ms / 1e9,
                "rel_diff_vs_sdpa": float((result - reference).norm() / reference.norm()),
            }
        except Exception as error:  # noqa: BLE001
            out[name] = {"error": f"{type(error).__name__}: {error}"}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def compare_losses(a: list[float], b: list[float]) -> dict[str, Any]:
    n = min(len(a), len(b))
    rel = [abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a[:n], b[:n], strict=True)]
    return {
        "steps": n,
        "max_rel_diff": max(rel) if rel else None,
        "first_step_rel_diff": rel[0] if rel else None,
    }


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
    for key in ("speedup", "loss_agreement"):
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
            if "derived" in prof:
                lines += [
                    "",
                    f"rates {key}: `{json.dumps({k: round(v, 3) for k, v in prof['derived'].items()})}`",
                ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and short packs (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--steps", type=int, default=30, help="optimiser steps per run (the first --warmup untimed)"
    )
    parser.add_argument("--warmup", type=int, default=3)
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

    # Most important first: each later section is skipped if the time limit is near.
    run = results.section
    run("posttrain_plain_sdpa", 30, lambda: run_posttrain(Variant("plain", "sdpa", "plain"), ctx))
    run("posttrain_varlen_chunked", 30, lambda: run_posttrain(Variant("fast"), ctx, profile=True))
    trl = run("trl_sdpa", 40, lambda: run_trl("sdpa", ctx, profile=True))
    run("loss_kernels", 20, lambda: bench_losses(ctx))
    run("attention_kernels", 40, lambda: bench_attention(ctx))
    run("posttrain_varlen_liger", 30, lambda: run_posttrain(Variant("liger", loss="liger"), ctx))
    run("posttrain_sdpa_chunked", 30, lambda: run_posttrain(Variant("sdpa_chunked", attn="sdpa"), ctx))
    run(
        "posttrain_varlen_chunked_checkpointing",
        30,
        lambda: run_posttrain(Variant("ckpt", checkpointing=True), ctx),
    )
    run("trl_sdpa_liger", 40, lambda: run_trl("sdpa", ctx, use_liger=True))
    run("posttrain_flex_chunked", 60, lambda: run_posttrain(Variant("flex", attn="flex_attention"), ctx))
    run("trl_flex", 60, lambda: run_trl("flex_attention", ctx))
    run(
        "posttrain_varlen_chunked_compiled",
        90,
        lambda: run_posttrain(Variant("compiled", compile=True), ctx, profile=True),
    )

    sections = results.data["sections"]
    timed = {k: v for k, v in sections.items() if isinstance(v, dict) and "tokens_per_s" in v}
    ours = {k: v for k, v in timed.items() if k.startswith("posttrain")}
    theirs = {k: v for k, v in timed.items() if k.startswith("trl")}
    if ours and theirs:
        best_ours = max(ours, key=lambda k: ours[k]["tokens_per_s"])
        best_theirs = max(theirs, key=lambda k: theirs[k]["tokens_per_s"])
        results.data["speedup"] = {
            "posttrain_best": best_ours,
            "trl_best": best_theirs,
            "tokens_per_s_ratio": ours[best_ours]["tokens_per_s"] / theirs[best_theirs]["tokens_per_s"],
        }
    if trl is not None:
        agreement = {k: compare_losses(v["losses"], trl["losses"]) for k, v in ours.items()}
        tolerance = 2e-2
        results.data["loss_agreement"] = {
            "vs": "trl_sdpa",
            "tolerance_rel": tolerance,
            "all_agree": all((a["max_rel_diff"] or 0) <= tolerance for a in agreement.values()),
            "per_run": agreement,
        }
    results.save()
    text = markdown(results.data)
    (Path(args.out) / "sft_gpu.md").write_text(text)
    print(text, flush=True)
    return results.data


if __name__ == "__main__":
    main()
