"""What the GPU benchmarks share: the model configs, the time-limited results file, timing, FLOPs and MFU,
model construction, AdamW, and the torch.profiler split of GPU time by kind and by launching phase.

Loaded by path by bench/sft_gpu.py (and through it by the other GPU benches): putting bench/ on sys.path would let
bench/sandbox.py shadow the `sandbox` package for everything imported later in the same process.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posttrain.data.packing import collate_packs  # noqa: E402

H100_PEAK_TFLOPS = 989.0  # dense bf16, datasheet (H100 and H200 SXM alike)
GEMM_CEILING_TFLOPS = 770.0  # bf16 8192³ measured on an H100 (an H200 measured 769–798 in other sessions)

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
# Model and data
# ----------------------------------------------------------------------------------------------------------------


def check_no_liger_patch() -> None:
    """Raise if Liger's kernels were patched into transformers' Llama module (TRL's `use_liger_kernel` does that
    for the whole process, not only for its own model): a posttrain run after it would time Liger's RMSNorm,
    SwiGLU and RoPE instead of its own path. The benches run the Liger variants last."""
    from transformers.models.llama import modeling_llama

    patched = [
        name
        for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP")
        if getattr(modeling_llama, name).__module__.startswith("liger")
    ]
    if patched:
        raise RuntimeError(f"transformers' Llama has Liger's {patched} patched in by an earlier TRL run")


def batch_tensors(dataset: Any, ids: range, device: torch.device) -> dict[str, torch.Tensor]:
    """The packs `ids` of a posttrain PackedDataset as one micro-batch on `device`, with the samples' offsets
    (`cu_seqlens`) computed on the host: what the SFT trainer's loader gives its step."""
    return collate_packs([dataset[i] for i in ids], device)


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


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (0 without compiled code)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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
    ("loss", re.compile(r"CrossEntropy|cross_entropy|log_softmax|LogSoftmax|nll_loss|NllLoss|Logprobs")),
]
# Kinds of kernel, first match wins: GEMMs of the loss's head count as GEMMs, its other kernels as "loss".
SPLIT_KINDS = [
    ("compiled_fused", re.compile(r"triton_(poi|red|per)_")),  # inductor's fused kernels of compiled blocks
    ("gemm", re.compile(r"triton_tem_fused_\w*mm")),  # inductor GEMM templates (max-autotune only)
    ("attention", re.compile(r"flash|fmha|attention|attn|flex|sdpa|triton_tem_fused", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|sm90_|sm80_|cublas|matmul|wgmma|aten::(add|b)?mm\b", re.I)),
    ("loss", re.compile(r"cross_entropy|log_softmax|softmax|logsumexp|nll|liger", re.I)),
    ("fp8_quantize", re.compile(r"quantize", re.I)),  # train.fp8's activation/gradient/weight quantisation
    (
        "elementwise",  # eager ATen element-wise, reduction, copy, index and cat kernels (names on CUDA and CPU)
        re.compile(r"elementwise|reduce_kernel|CatArray|index|scatter|gather|fill|copy|aten::", re.I),
    ),
]
SPLIT_ORDER = [
    "gemm",
    "attention",
    "loss",
    "optimizer",
    "compiled_fused",
    "fp8_quantize",
    "elementwise",
    "other",
]
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


# Host calls that wait for the GPU: a profiled step that holds one cannot queue work ahead of the device.
_SYNC_CALLS = re.compile(
    r"^(cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cuStreamSynchronize|cuCtxSynchronize"
    r"|aten::_local_scalar_dense|aten::nonzero)$"
)


def gpu_timeline(prof: Any, steps: int) -> dict[str, Any]:
    """Where the GPU waits in the profiled steps: the span from their first to their last kernel, the time some
    kernel or copy runs (busy), the rest (idle: the host was behind, or waited for the GPU itself), the longest
    idle gaps with the kernels on either side, and the host calls per step that wait for the GPU (syncs; the
    profiler's own closing synchronize counts once in all)."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = prof.events()
    annotations = {e.name for e in events if getattr(e, "is_user_annotation", False)}
    work = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == cuda and e.name not in annotations and not e.name.startswith(_RANGES)
    )
    if not work:
        return {}
    busy_us, gaps = 0.0, []
    start, end, last_name = work[0]
    for begin, finish, name in work[1:]:
        if begin > end:
            busy_us += end - start
            gaps.append((begin - end, last_name, name))
            start = begin
        if finish >= end:
            end, last_name = finish, name
    busy_us += end - start
    span_us = work[-1][1] - work[0][0]
    syncs: dict[str, int] = {}
    for event in events:
        if event.device_type == cpu and _SYNC_CALLS.match(event.name):
            syncs[event.name] = syncs.get(event.name, 0) + 1
    return {
        "span_ms_per_step": round(span_us / 1e3 / steps, 3),
        "busy_ms_per_step": round(busy_us / 1e3 / steps, 3),
        "idle_ms_per_step": round((span_us - busy_us) / 1e3 / steps, 3),
        "longest_idle_gaps": [
            f"{gap / 1e3:.2f} ms after {before[:60]} before {after[:60]}"
            for gap, before, after in sorted(gaps, reverse=True)[:8]
        ],
        "syncs_per_step": {name: round(count / steps, 2) for name, count in sorted(syncs.items())},
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
    host: dict[str, float] = {}  # self CPU time of host ops and runtime calls: where a host-bound step goes
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False) or event.key.startswith(_RANGES):
            continue  # ranges around kernels (e.g. "Optimizer.step#AdamW.step"), not kernels: no double count
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                host[event.key[:100]] = event.self_cpu_time_total
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
    if host:
        result["host_self_ms_per_step"] = {
            k: round(v / 1e3 / steps, 3) for k, v in sorted(host.items(), key=lambda kv: -kv[1])[:25]
        }
    try:
        result |= phase_split(prof, device, steps)
    except Exception as error:  # noqa: BLE001 (the name-based share stands without it)
        result["split_error"] = f"{type(error).__name__}: {error}"
    if device.type == "cuda":
        try:
            result["timeline"] = gpu_timeline(prof, steps)
        except Exception as error:  # noqa: BLE001 (as above)
            result["timeline_error"] = f"{type(error).__name__}: {error}"
    return result


def compare_losses(a: list[float], b: list[float]) -> dict[str, Any]:
    n = min(len(a), len(b))
    rel = [abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a[:n], b[:n], strict=True)]
    return {
        "steps": n,
        "max_rel_diff": max(rel) if rel else None,
        "first_step_rel_diff": rel[0] if rel else None,
    }
