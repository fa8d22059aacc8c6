"""What every trainer shares: accelerate set-up, optimiser and schedule, atomic checkpoints and exact resume,
metrics and progress. The trainers (sft.py, grpo.py, distill.py) read top to bottom and call these.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from posttrain.config import CheckpointSection, LoggingSection, TrainSection, dump_recipe
from posttrain.errors import RunExistsError
from posttrain.metrics import MetricsWriter
from posttrain.report import write_report

log = logging.getLogger(__name__)


def lr_factor(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Multiplier on `lr` at optimiser step `step` (0-based): linear warm-up, then cosine decay to min_lr.

    warm-up  (s < W):  (s + 1) / W
    decay    (s ≥ W):  [min_lr + (lr − min_lr) · ½ (1 + cos(π · (s − W) / max(1, T − W − 1)))] / lr
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return (min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / lr


def make_accelerator(train: TrainSection) -> Accelerator:
    precision = train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    set_seed(train.seed)
    return accelerator


def autocast_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The dtype `accelerator.autocast()` computes in, None without mixed precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def compile_blocks_enabled(
    train: TrainSection, device: torch.device, decodes_with_policy: bool = False, moe_model: bool = False
) -> bool:
    """`train.compile_blocks`, with "auto" = on for CUDA; off on CPU (Inductor's compile time outweighs a CPU
    run's gain), when the trainer decodes with the policy module itself (each decoding shape would recompile),
    and for posttrain's DeepSeek-V3 (its MoE blocks have not been measured compiled: set it true to try)."""
    if train.compile_blocks == "auto":
        return device.type == "cuda" and not decodes_with_policy and not moe_model
    return bool(train.compile_blocks)


def apply_memory_and_speed_switches(
    policy: torch.nn.Module, train: TrainSection, decodes_with_policy: bool = False
) -> None:
    """`train.gradient_checkpointing`, `train.fp8` and `train.compile_blocks`, the same way for every trainer.

    FP8 swaps every nn.Linear of the model for an FP8Linear (posttrain.model.fp8_linear) except the output head, the
    MoE router and embeddings/norms, which stay in higher precision as in DeepSeek-V3; the Parameters stay the
    master weights, so optimiser and checkpoints are unchanged. The blocks are compiled after the swap.
    """
    if train.gradient_checkpointing and hasattr(policy.model, "gradient_checkpointing_enable"):
        policy.model.gradient_checkpointing_enable()
    if train.fp8:
        from posttrain.model.fp8_linear import convert_to_fp8

        if not convert_to_fp8(policy.model):
            raise ValueError(
                f"train.fp8: {type(policy.model).__name__} has no nn.Linear layers to run in FP8"
            )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where accelerate will put it
    if compile_blocks_enabled(
        train, device, decodes_with_policy, getattr(policy, "is_posttrain_model", False)
    ):
        from posttrain.fast.backbone import compile_decoder_layers, decoder_layers

        compile_decoder_layers(policy.model)
        if train.fp8:  # each block's FP8 weights quantised eagerly before it runs, once per optimiser step
            from posttrain.model.fp8_linear import refresh_quantized_weights_before

            for layer in decoder_layers(policy.model):
                refresh_quantized_weights_before(layer)


def make_optimizer(params: list[torch.nn.Parameter], train: TrainSection) -> torch.optim.AdamW:
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr,
        betas=train.betas,
        fused=fused,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection, total_steps: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, train.warmup_steps, train.lr, train.min_lr)
    )


def update_expert_bias(policy: torch.nn.Module, gamma: float) -> dict[str, float]:
    """Auxiliary-loss-free balancing after an optimiser step, for MoE models that support it: returns the
    worst layer's max/mean expert load (over all ranks) for the metrics, or {} for other models."""
    update = getattr(getattr(policy, "model", None), "update_routing_bias", None)
    if update is None or gamma <= 0:
        return {}
    return {"moe/max_over_mean_load": update(gamma)["max_over_mean_load"]}


class Checkpointer:
    """Checkpoints under <output_dir>/checkpoints/step_<N>: model, optimiser, scheduler and RNG states (through
    accelerate) plus `trainer_state.json` (step and the trainer's own counters).

    Writing goes to a temporary directory that is renamed into place only when complete, so a run killed at
    any moment leaves either the previous checkpoint or the new one, never half of one.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, cfg: CheckpointSection) -> None:
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.cfg = cfg

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.cfg.every > 0 and step % self.cfg.every == 0)

    def save(self, step: int, state: dict[str, Any]) -> None:
        final = self.root / f"step_{step:08d}"
        partial = self.root / f".partial_step_{step:08d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        if self.accelerator.is_main_process:
            (partial / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
            _fsync_dir(partial)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _fsync_dir(self.root)
            for old in self.completed()[: -self.cfg.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def completed(self) -> list[Path]:
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith("step_"))

    def restore_latest(self) -> dict[str, Any] | None:
        """Load the newest complete checkpoint into the prepared objects; None when there is none."""
        done = self.completed()
        if not done:
            return None
        self.accelerator.load_state(str(done[-1]))
        return json.loads((done[-1] / "trainer_state.json").read_text())


def _fsync_dir(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


class Progress:
    """A progress bar with loss, tokens/s and ETA on the main process, and metrics to JSONL/TensorBoard; on
    CUDA every metrics row also carries the process's peak allocated memory so far (`memory/peak_gib`)."""

    def __init__(
        self, accelerator: Accelerator, output_dir: str | Path, cfg: LoggingSection, total: int, start: int
    ) -> None:
        self.main = accelerator.is_main_process
        self.device = accelerator.device
        self.cfg = cfg
        self.metrics = MetricsWriter(output_dir, tensorboard=cfg.tensorboard, enabled=self.main)
        if start > 0:
            self.metrics.truncate_after(start)
        self.bar = tqdm(total=total, initial=start, disable=not (self.main and cfg.progress), unit="step")

    def step(self, step: int, values: dict[str, Any], postfix: dict[str, str]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(postfix, refresh=False)
        if step % self.cfg.every == 0:
            self.metrics.write(step, {**values, **peak_memory(self.device)})

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def peak_memory(device: torch.device) -> dict[str, float]:
    """{"memory/peak_gib": the allocator's peak since the process started} on CUDA (host-side bookkeeping, no
    device sync), {} elsewhere."""
    if device.type != "cuda":
        return {}
    return {"memory/peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def refuse_existing_run(output_dir: str | Path, resume: bool) -> None:
    """A RunExistsError for an output_dir that holds a run's checkpoints, unless resuming it. Cheap: entry
    points that do expensive work before training (an evaluation) call it first."""
    checkpoints = Path(output_dir) / "checkpoints"
    if not resume and checkpoints.exists() and any(checkpoints.iterdir()):
        raise RunExistsError(
            "output_dir already holds checkpoints: pass --resume to continue that run, --overwrite to "
            "delete it and start afresh, or choose another output_dir",
            file=str(output_dir),
        )


def prepare_output_dir(output_dir: str | Path, recipe: Any, accelerator: Accelerator, resume: bool) -> Path:
    out = Path(output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        refuse_existing_run(out, resume)
        dump_recipe(recipe, out / "recipe.yaml")
    accelerator.wait_for_everyone()
    return out


class StepTimer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float | None,
) -> float | None:
    """Clip the gradients to `max_grad_norm` (when set), step the optimiser and the schedule, clear the
    gradients; returns the gradient norm before clipping (None without clipping)."""
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def save_final_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: Any,
    out: Path,
    panels: list,
    title: str,
) -> Path:
    """<out>/model (HF format, with the tokenizer) and the end-of-run report, written by the main process once
    every rank is done."""
    model_dir = out / "model"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        write_report(out, panels, title=title)
    accelerator.wait_for_everyone()
    return model_dir
