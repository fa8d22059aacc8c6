"""SFT step on 1 and 2 GPUs of one host through accelerate: throughput scaling and loss agreement at the same
global batch.

The step is bench/sft_gpu.py's fastest eager posttrain variant, written the way posttrain/trainers/sft.py runs it
under accelerate: the prepared `Policy` returns hidden states (varlen attention over packed samples), the
chunked cross-entropy goes through the head, fp32 master weights + bf16 autocast, fused AdamW, clip 1.0. The
loss of a step is Σ CE / N_targets over the whole global batch (counts summed over ranks), and DDP/FSDP's
gradient average over ranks is undone, so 2 processes take the update of 1.

Runs, each launched by `accelerate launch` with a config file written to --out (what a user would pass):
  1_process         one process, one GPU (no wrapper): --micro-batch packs per forward, accumulated
  2_processes_ddp   2 processes, DDP (`--strategy ddp`, the default)
  2_processes_fsdp2 2 processes, accelerate's FSDP plugin version 2 (`--strategy fsdp2`; its default bf16
                    policy: parameters gathered and gradients reduced in bf16, fp32 shards in the optimiser)
All see the same packs in the same order: step s takes packs [s·G, (s+1)·G) of --global-batch G, rank r the
r-th contiguous slice. Before timing, the step-0 loss of a 2-process run must equal the 1-process one (the worker
stops otherwise); afterwards the per-step losses and gradient norms are compared.

Reported per run: tokens/s over all GPUs, step time, MFU per GPU (model FLOPs incl. causal attention within each
sample, over 989 TFLOP/s dense bf16 and the 770 TFLOP/s measured GEMM ceiling), peak memory per GPU, losses;
then scaling efficiency = tokens/s(2) / (2 · tokens/s(1)). On CUDA each process takes a GPU: a run that needs
more GPUs than the host shows is recorded as skipped ("needs 2 GPUs, found 1"), and the others still run.

    python3 bench/sft_scaling.py --out $OUT --time-limit 480                     # 2 GPUs, DDP
    python3 bench/sft_scaling.py --out $OUT --time-limit 480 --strategy ddp fsdp2
    python3 bench/sft_scaling.py --tiny --device cpu --steps 4 --warmup 1       # CPU smoke: 2 gloo processes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

# The SFT benchmark's harness, loaded by path as bench/moe_gpu.py does (bench/ on sys.path would let
# bench/sandbox.py shadow the `sandbox` package).
_harness = importlib.util.spec_from_file_location("sft_gpu", Path(__file__).resolve().parent / "sft_gpu.py")
sys.modules["sft_gpu"] = importlib.util.module_from_spec(_harness)
_harness.loader.exec_module(sys.modules["sft_gpu"])

from sft_gpu import (  # noqa: E402 (model configs, data, model, AdamW, FLOPs, results)
    GEMM_CEILING_TFLOPS,
    H100_PEAK_TFLOPS,
    LLAMA_1B,
    TINY,
    Packs,
    Results,
    batch_tensors,
    build_model,
    compare_losses,
    environment,
    make_adamw,
    make_samples,
    matmul_params,
    peak_gib,
    sync,
    throughput,
)

from posttrain.algorithms.sft import shifted_targets  # noqa: E402
from posttrain.data.packing import plan_packs  # noqa: E402
from posttrain.fast.attention import VARLEN_ATTENTION, register_varlen_attention  # noqa: E402
from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum  # noqa: E402
from posttrain.policy import Policy  # noqa: E402

DECODER_LAYER = "LlamaDecoderLayer"  # both model configs are Llama-shaped: FSDP2 shards each block on its own
LOSS_RTOL = 2e-2  # per-step losses over the run, bf16 (sft_gpu's tolerance against TRL)
FP32_RTOL = 1e-5  # CPU runs are fp32: 1 and 2 processes differ only in summation order


# ----------------------------------------------------------------------------------------------------------------
# Data: sft_gpu's samples, packed by posttrain's planner (what the trainer uses)
# ----------------------------------------------------------------------------------------------------------------


def build_packs(cfg: dict[str, Any], capacity: int, n_packs: int, seed: int) -> Packs:
    """The first `n_packs` packs of a best-fit-decreasing plan over sft_gpu's log-normal samples; deterministic,
    so every process of every run builds the same ones."""
    samples = make_samples(int(n_packs * 4096 / 700) + 40, capacity, cfg["vocab_size"], seed)
    plan = plan_packs(np.array([len(s) for s in samples]), capacity)
    if plan.n_bins < n_packs:
        raise SystemExit(f"not enough packs: {plan.n_bins} < {n_packs}")
    return Packs(
        capacity, [[samples[i] for i in plan.bin(b)] for b in range(n_packs)], "posttrain plan_packs"
    )


# ----------------------------------------------------------------------------------------------------------------
# Worker: one process of a launched run
# ----------------------------------------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> NoReturn:
    """Train --steps steps; rank 0 writes the run's figures to args.worker (a JSON path)."""
    from accelerate import Accelerator

    if args.device == "cpu":
        torch.set_num_threads(
            1
        )  # tiny matrices on a shared machine: OpenMP barriers cost more than they save
    accelerator = Accelerator(cpu=args.device == "cpu")  # precision and strategy come from the launch config
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    global_batch, micro = args.global_batch, args.micro_batch
    if global_batch % (world * micro):
        raise SystemExit(
            f"--global-batch {global_batch} is not a multiple of {world} processes × {micro} packs"
        )
    per_rank = global_batch // world
    cfg = TINY if args.tiny else LLAMA_1B
    packs = build_packs(cfg, args.capacity, global_batch * args.steps, args.seed)
    dataset = packs.dataset(pad_id=0)

    register_varlen_attention()
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    model = build_model(cfg, VARLEN_ATTENTION, device, None)
    optimizer = make_adamw(model, args.lr)
    policy, optimizer = accelerator.prepare(Policy(model), optimizer)

    losses, grad_norms, checksums, timed_from = [], [], [], None
    for step in range(args.steps):
        if step == args.warmup:
            sync(device)
            accelerator.wait_for_everyone()
            timed_from = time.perf_counter()
        first = step * global_batch + rank * per_rank
        batches = [
            batch_tensors(dataset, range(a, a + micro), device) for a in range(first, first + per_rank, micro)
        ]
        targets = [shifted_targets(b["input_ids"], b["loss_mask"], b["position_ids"]) for b in batches]
        # The step's loss is a mean over its global target tokens, whichever rank or micro-batch holds them.
        count = accelerator.reduce(torch.stack([(t != -100).sum() for t in targets]).sum(), reduction="sum")
        loss_sum = torch.zeros((), device=device)
        for i, (batch, target) in enumerate(zip(batches, targets, strict=True)):
            with accelerator.no_sync(policy) if i < len(batches) - 1 else nullcontext():
                with accelerator.autocast():
                    out = policy(batch["input_ids"], batch["position_ids"], hidden_only=True)
                    total, _ = chunked_token_cross_entropy_sum(
                        out.hidden.flatten(0, 1), out.head_weight, target.flatten(), args.chunk_size
                    )
                # DDP and FSDP average gradients over ranks; the loss is already a global mean: undo that.
                accelerator.backward(total / count * world)
            loss_sum += total.detach().float()
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(accelerator.reduce(loss_sum, reduction="sum") / count)
        grad_norms.append(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        local_tokens = torch.stack([b["input_ids"].sum() for b in batches]).sum()
        checksums.append(accelerator.reduce(local_tokens, reduction="sum"))  # the packs this step saw
        if step == 0 and args.expect_step0_loss is not None:
            step0, expected = float(losses[0]), args.expect_step0_loss
            if abs(step0 - expected) > args.step0_rtol * abs(expected):
                raise SystemExit(
                    f"step-0 loss {step0:.7f} with {world} processes != {expected:.7f} with one "
                    f"(rtol {args.step0_rtol}): normalisation or data sharding differs; nothing timed"
                )
    sync(device)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - timed_from
    peaks = (
        [peak_gib(device)]
        if device.type != "cuda"
        else accelerator.gather(torch.tensor([peak_gib(device)], device=device)).tolist()
    )
    if accelerator.is_main_process:
        timed = range(args.warmup, args.steps)
        figures = throughput(
            cfg, [packs.lengths(range(s * global_batch, (s + 1) * global_batch)) for s in timed], seconds
        )
        tflops_per_gpu = figures["model_tflops"] / world
        result = {
            "processes": world,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version if accelerator.is_fsdp2 else None,
            "mixed_precision": accelerator.mixed_precision,
            "packs_per_rank": per_rank,
            "micro_batches_per_rank": per_rank // micro,
            **figures,
            "step_s": seconds / len(timed),
            "model_tflops_per_gpu": tflops_per_gpu,
            "mfu_vs_989": tflops_per_gpu / H100_PEAK_TFLOPS,
            "mfu_vs_770": tflops_per_gpu / GEMM_CEILING_TFLOPS,
            "peak_gib_per_gpu": peaks,
            "losses": [float(x) for x in losses],
            "grad_norms": [float(x) for x in grad_norms],
            "token_checksums": [int(x) for x in checksums],
            "env": environment(device),
        }
        Path(args.worker).write_text(json.dumps(result, indent=1))
    accelerator.end_training()
    # Freeing the DDP model can deadlock on CPU: its gloo process group's destructor joins a thread that waits for
    # the GIL the freeing thread holds. The results are written, so the worker leaves without running destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------------------------------------------
# Launcher: one `accelerate launch` per run, under the time limit
# ----------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_config(processes: int, strategy: str, device: str) -> str:
    """An accelerate config file's text (YAML is a superset of JSON) for one run on this host."""
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO",
        "num_processes": processes,
        "num_machines": 1,
        "machine_rank": 0,
        "main_process_port": free_port(),
        "mixed_precision": "bf16" if device == "cuda" else "no",
        "use_cpu": device == "cpu",
        "debug": False,
        "gpu_ids": "all",
    }
    if processes > 1 and strategy == "ddp":
        # MULTI_GPU also on CPU: torchrun then starts the processes, and Accelerator(cpu=True) joins them by gloo.
        config |= {"distributed_type": "MULTI_GPU", "use_cpu": False}
    elif processes > 1 and strategy == "fsdp2":
        if device == "cpu":
            raise SystemExit("--strategy fsdp2 needs GPUs: accelerate runs FSDP on accelerators only")
        config |= {
            "distributed_type": "FSDP",
            "fsdp_config": {
                "fsdp_version": 2,
                "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "fsdp_transformer_layer_cls_to_wrap": DECODER_LAYER,
                "fsdp_reshard_after_forward": True,
                "fsdp_offload_params": False,
                "fsdp_cpu_ram_efficient_loading": False,
                "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                "fsdp_activation_checkpointing": False,
            },
        }
    return json.dumps(config, indent=1)


def stream(cmd: list[str], log: Path, timeout: float) -> int:
    """Run `cmd` in its own process group, echoing and logging its output; stop the group after `timeout`."""
    with (
        log.open("w") as sink,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        ) as proc,
    ):

        def stop() -> None:
            with suppress(ProcessLookupError):  # it may have ended meanwhile
                os.killpg(proc.pid, signal.SIGTERM)  # the launcher passes it on to its workers
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                sink.write(line)
        finally:
            timer.cancel()
        return proc.wait()


def launch(
    args: argparse.Namespace, name: str, processes: int, strategy: str, results: Results, expect: float | None
) -> dict[str, Any]:
    out = Path(args.out)
    config = out / f"accelerate_{name}.yaml"
    config.write_text(accelerate_config(processes, strategy, args.device))
    result = out / f"{name}.json"
    result.unlink(missing_ok=True)
    worker = [
        "--worker", str(result), "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--global-batch", str(args.global_batch), "--micro-batch", str(args.micro_batch), "--lr", str(args.lr),
        "--seed", str(args.seed), "--chunk-size", str(args.chunk_size), "--capacity", str(args.capacity),
        "--step0-rtol", str(args.step0_rtol),
    ]  # fmt: skip
    worker += ["--tiny"] if args.tiny else []
    worker += ["--expect-step0-loss", repr(expect)] if expect is not None else []
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        __file__,
        *worker,
    ]
    started = time.monotonic()
    code = stream(cmd, out / f"{name}.log", timeout=max(1.0, results.left() - 5))
    if code != 0 or not result.exists():
        tail = (out / f"{name}.log").read_text()[-2000:]
        raise RuntimeError(f"{name} exited with {code} (log {out / f'{name}.log'}):\n{tail}")
    record = json.loads(result.read_text())
    if record["processes"] != processes:
        raise RuntimeError(f"{name}: launched {processes} processes, the run saw {record['processes']}")
    if strategy == "fsdp2" and processes > 1 and record["fsdp_version"] != 2:
        raise RuntimeError(f"{name}: asked for FSDP2, ran {record['distributed_type']}")
    return {**record, "strategy": strategy if processes > 1 else "single", "launch_s": time.monotonic() - started,
            "command": " ".join(cmd)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def agreement(run: dict[str, Any], reference: dict[str, Any], rtol: float) -> dict[str, Any]:
    losses = compare_losses(run["losses"], reference["losses"])
    norms = compare_losses(run["grad_norms"], reference["grad_norms"])
    return {
        "same_packs": run["token_checksums"] == reference["token_checksums"],
        "loss_max_rel_diff": losses["max_rel_diff"],
        "loss_step0_rel_diff": losses["first_step_rel_diff"],
        "grad_norm_max_rel_diff": norms["max_rel_diff"],
        "tolerance_rel": rtol,
        "agree": run["token_checksums"] == reference["token_checksums"]
        and losses["max_rel_diff"] <= rtol
        and norms["max_rel_diff"] <= rtol,
    }


def markdown(data: dict[str, Any]) -> str:
    runs = {k: v for k, v in data["sections"].items() if isinstance(v, dict)}
    lines = [
        f"# SFT scaling over processes ({data.get('gpu') or data['device']})",
        "",
        f"`{data['command']}`",
        "",
    ]
    lines += [
        "| run | processes | tokens/s | step s | TFLOP/s per GPU | MFU (989) | MFU (770) | peak GiB per GPU |"
        " final loss |",
        "|" + " --- |" * 9,
    ]
    for name, run in runs.items():
        if "tokens_per_s" not in run:
            lines.append(f"| {name} | {run.get('skipped') or run.get('error', '')[:200]} | | | | | | | |")
            continue
        peaks = ", ".join("-" if p is None else f"{p:.1f}" for p in run["peak_gib_per_gpu"])
        lines.append(
            f"| {name} | {run['processes']} | {run['tokens_per_s']:,.0f} | {run['step_s']:.3f} | "
            f"{run['model_tflops_per_gpu']:.1f} | {100 * run['mfu_vs_989']:.1f}% | {100 * run['mfu_vs_770']:.1f}% | "
            f"{peaks} | {run['losses'][-1]:.4f} |"
        )
    for key in ("scaling_efficiency", "agreement"):
        if data.get(key):
            lines += ["", f"**{key}**: `{json.dumps(data[key])}`"]
    curves = {k: v["losses"] for k, v in runs.items() if v.get("losses")}
    if curves:
        lines += ["", "| step | " + " | ".join(curves) + " |", "|" + " --- |" * (len(curves) + 1)]
        for step in range(max(map(len, curves.values()))):
            cells = [f"{c[step]:.5f}" if step < len(c) else "" for c in curves.values()]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="sft_gpu's tiny model and 256-token packs")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--strategy", nargs="+", choices=["ddp", "fsdp2"], default=["ddp"], help="2-process runs"
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="optimiser steps per run (the first --warmup untimed)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--global-batch", type=int, default=4, help="packs per optimiser step, over all processes"
    )
    parser.add_argument("--micro-batch", type=int, default=2, help="packs per forward on one process")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chunk-size", type=int, default=4096, help="rows per chunk of the fused head + loss"
    )
    parser.add_argument("--capacity", type=int, help="tokens per pack (default 4096; 256 with --tiny)")
    parser.add_argument(
        "--step0-rtol", type=float, help="step-0 loss agreement (default 1e-3 on CUDA, 1e-5 on CPU)"
    )
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole script")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/bench_sft_scaling"))
    parser.add_argument("--worker", metavar="RESULT_JSON", help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("--expect-step0-loss", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.capacity = args.capacity or (256 if args.tiny else 4096)
    args.step0_rtol = args.step0_rtol or (1e-3 if args.device == "cuda" else FP32_RTOL)
    if not 0 < args.warmup < args.steps:
        parser.error("need 0 < --warmup < --steps")
    if args.worker:
        run_worker(args)  # does not return

    results = Results(Path(args.out), "sft_scaling", args.time_limit)
    data = results.data
    data["command"] = " ".join(["sft_scaling.py", *(argv if argv is not None else sys.argv[1:])])
    data["device"] = args.device
    cfg = TINY if args.tiny else LLAMA_1B
    data["model"] = {"config": cfg, "matmul_params": matmul_params(cfg), "capacity": args.capacity}
    data["batch"] = {"global_packs": args.global_batch, "micro_packs": args.micro_batch, "steps": args.steps}

    data["gpus_visible"] = torch.cuda.device_count() if args.device == "cuda" else None

    def run(name: str, processes: int, strategy: str, expect: float | None) -> dict[str, Any] | None:
        """One launched run, or a 'skipped' record where this host lacks a GPU per process."""
        short = missing_gpus(args.device, processes)
        if short is not None:
            data["sections"][name] = {"skipped": short}
            print(f"[{name}] skipped: {short}", flush=True)
            return None
        return results.section(name, 60, lambda: launch(args, name, processes, strategy, results, expect))

    one = run("1_process", 1, "single", None)
    step0 = one["losses"][0] if one else None
    data["gpu"] = one["env"].get("gpu") if one else None
    save(results)
    rtol = FP32_RTOL if args.device == "cpu" else LOSS_RTOL
    data["scaling_efficiency"], data["agreement"] = {}, {}
    for strategy in args.strategy:
        two = run(f"2_processes_{strategy}", 2, strategy, step0)
        if one and two:
            data["scaling_efficiency"][strategy] = two["tokens_per_s"] / (2 * one["tokens_per_s"])
            data["agreement"][strategy] = agreement(two, one, rtol)
        save(results)
    text = save(results)
    print(text, flush=True)
    return data


def missing_gpus(device: str, processes: int) -> str | None:
    """Why a run of `processes` processes cannot start here (one GPU each on CUDA), or None if it can."""
    if device != "cuda":
        return None  # CPU processes: as many as asked
    found = torch.cuda.device_count()  # no CUDA context in the launcher: the workers own the GPUs
    return None if found >= processes else f"needs {processes} GPU{'s' * (processes > 1)}, found {found}"


def save(results: Results) -> str:
    """JSON and Markdown after every run, so a killed script still leaves both."""
    results.save()
    text = markdown(results.data)
    (results.out / "sft_scaling.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
