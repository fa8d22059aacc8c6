"""Supervised fine-tuning on packed samples with MTP kept on (DeepSeek-V3 post-training, §5.1).

One optimiser step = `grad_accum` micro-batches of `micro_batch_size` packs on every rank. The loss of the step
is the mean over all its target tokens, whichever micro-batch or rank they landed in:

    L = Σ_{tokens} CE / N_targets(step)  +  λ/D · Σ_k Σ_{tokens} CE_k / N_targets_k(step)

so 4 micro-batches of 1 pack give the same update as 1 batch of 4, and 2 processes the same as 1.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from posttrain.algorithms.sft import IGNORE_INDEX, mtp_combined_loss, shifted_targets, token_cross_entropy_sum
from posttrain.config import SFTRecipe, TrainSection
from posttrain.data.packing import PackedDataset, PackPlan, TokenizedSamples, collate_packs, plan_packs
from posttrain.data.sft import DataReport, build_sft_samples
from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum
from posttrain.policy import Policy, build_policy, load_tokenizer
from posttrain.trainers.loop import (
    Checkpointer,
    Progress,
    StepTimer,
    apply_memory_and_speed_switches,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    prepare_output_dir,
    save_final_model,
    update_expert_bias,
)

log = logging.getLogger(__name__)

SFT_REPORT_PANELS = ["loss", "main_loss", "mtp_loss", "lr", "tokens_per_s", "grad_norm"]


def step_pack_ids(step: int, n_packs: int, global_batch: int, seed: int) -> np.ndarray:
    """The packs of optimiser step `step`: epoch e visits a permutation seeded by (seed, e).

    The last step of an epoch is filled up from the start of the same permutation, so every step has the same
    number of packs on every rank (a rank with nothing to do would stall the others' all-reduce).
    """
    steps_per_epoch = math.ceil(n_packs / global_batch)
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_packs)
    ids = order[k * global_batch : (k + 1) * global_batch]
    if len(ids) < global_batch:
        ids = np.concatenate([ids, np.resize(order, global_batch - len(ids))])
    return ids


def packed_sft_data(
    recipe: SFTRecipe, tokenizer: Any, accelerator: Accelerator
) -> tuple[PackedDataset, DataReport]:
    """The recipe's rows validated, templated and tokenised (the main process tokenises, the others read its
    cache), in packs of `recipe.pack_capacity` tokens, or one sample per row of data.max_seq_len with packing
    off; and what happened to the rows."""
    with accelerator.main_process_first():
        samples, data_report = build_sft_samples(recipe.data, tokenizer, cache_dir=recipe.data.cache_dir)
    if recipe.packing.enabled:
        plan = plan_packs(samples.lengths, recipe.pack_capacity)
    else:
        plan = _one_sample_per_row(samples, recipe.data.max_seq_len)
    return PackedDataset(samples, plan, pad_id=tokenizer.pad_token_id), data_report


def steps_per_epoch(dataset: PackedDataset, train: TrainSection, world: int) -> int:
    """Optimiser steps that visit every pack once: `micro_batch_size` × `grad_accum` packs per rank per step."""
    return math.ceil(dataset.plan.n_bins / (train.micro_batch_size * train.grad_accum * world))


def step_batches(
    dataset: PackedDataset, step: int, train: TrainSection, accelerator: Accelerator, mtp_depth: int
) -> tuple[list[dict[str, torch.Tensor]], list[list[torch.Tensor]], torch.Tensor]:
    """This rank's micro-batches of optimiser step `step`, their targets (main head, then each MTP depth) and
    the step's target count per head summed over all ranks: the normaliser of the step's mean loss."""
    per_step = train.micro_batch_size * train.grad_accum
    rank, world = accelerator.process_index, accelerator.num_processes
    ids = step_pack_ids(step, dataset.plan.n_bins, per_step * world, train.seed)
    local = ids[rank * per_step : (rank + 1) * per_step]
    batches = _micro_batches(dataset, local, train.micro_batch_size, accelerator.device)
    targets = [_targets(b, mtp_depth) for b in batches]
    counts = torch.stack([torch.stack([(t != IGNORE_INDEX).sum() for t in ts]) for ts in targets]).sum(0)
    return batches, targets, accelerator.reduce(counts, reduction="sum")


def _micro_batches(dataset: PackedDataset, ids: np.ndarray, size: int, device: torch.device) -> list[dict]:
    return [
        collate_packs([dataset[int(i)] for i in ids[start : start + size]], device)
        for start in range(0, len(ids), size)
    ]


def _targets(batch: dict[str, torch.Tensor], mtp_depth: int) -> list[torch.Tensor]:
    """Targets for the main head (shift 1) and each MTP depth k (shift 1 + k)."""
    return [
        shifted_targets(batch["input_ids"], batch["loss_mask"], batch["position_ids"], shift=1 + k)
        for k in range(mtp_depth + 1)
    ]


def mtp_depth_of(policy: Policy, recipe: SFTRecipe) -> int:
    return policy.mtp_depth if recipe.model.mtp.enabled else 0


def train_sft(recipe: SFTRecipe, resume: bool = False) -> Path:
    """Run the recipe; returns the directory of the saved HF-format model."""
    accelerator = make_accelerator(recipe.train)
    out = prepare_output_dir(recipe.output_dir, recipe, accelerator, resume)
    tokenizer = load_tokenizer(recipe.model)

    dataset, data_report = packed_sft_data(recipe, tokenizer, accelerator)
    plan = dataset.plan
    if accelerator.is_main_process:
        data_summary = {**data_report.as_dict(), "packs": plan.n_bins, "pack_capacity": plan.capacity}
        data_summary["packing_efficiency"] = plan.efficiency
        (out / "data_report.json").write_text(json.dumps(data_summary, indent=2))
        log.info(
            "data: %d samples in %d packs (efficiency %.2f%%)",
            len(dataset.samples),
            plan.n_bins,
            100 * plan.efficiency,
        )

    policy = build_policy(recipe.model)
    apply_memory_and_speed_switches(policy, recipe.train)
    mtp_depth = mtp_depth_of(policy, recipe)
    train = recipe.train
    epoch_steps = steps_per_epoch(dataset, train, accelerator.num_processes)
    total_steps = train.max_steps or max(1, math.ceil(train.epochs * epoch_steps))

    optimizer = make_optimizer(list(policy.parameters()), train)
    scheduler = make_scheduler(optimizer, train, total_steps)
    model, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    checkpointer = Checkpointer(accelerator, out, recipe.checkpoint)
    start_step = 0
    if resume:
        state = checkpointer.restore_latest()
        start_step = state["step"] if state else 0
        log.info("resuming at step %d", start_step)

    progress = Progress(accelerator, out, recipe.logging, total_steps, start_step)
    timer = StepTimer()
    unwrapped: Policy = accelerator.unwrap_model(model)
    for step in range(start_step, total_steps):
        batches, targets, global_counts = step_batches(dataset, step, train, accelerator, mtp_depth)

        loss_sums = torch.zeros(mtp_depth + 1, device=accelerator.device)
        model.train()
        for i, (batch, batch_targets) in enumerate(zip(batches, targets, strict=True)):
            last = i == len(batches) - 1
            with accelerator.no_sync(model) if not last else nullcontext(), accelerator.autocast():
                chunk = train.loss_chunk_size
                out_lm = model(
                    batch["input_ids"],
                    batch["position_ids"],
                    with_mtp=mtp_depth > 0,
                    hidden_only=bool(chunk),
                    cu_seqlens=batch["cu_seqlens"],
                )
                if chunk:  # the head and the loss fused per chunk of rows: no [tokens, vocab] logits
                    hidden, targets_flat = out_lm.hidden.flatten(0, 1), batch_targets[0].flatten()
                    sums = [
                        chunked_token_cross_entropy_sum(hidden, out_lm.head_weight, targets_flat, chunk)[0]
                    ]
                else:
                    sums = [token_cross_entropy_sum(out_lm.logits, batch_targets[0])[0]]
                # MTP depth k returns [B, L - k, V] logits: position i predicts token i + 1 + k.
                sums += [
                    token_cross_entropy_sum(lg, t[:, : lg.shape[1]])[0]
                    for lg, t in zip(out_lm.mtp_logits, batch_targets[1:])
                ]
                loss = mtp_combined_loss(
                    sums[0], global_counts[0], sums[1:], list(global_counts[1:]), recipe.model.mtp.weight
                )
                if out_lm.aux_loss is not None:  # sequence-wise balance loss (report Eq. 17-20), if enabled
                    loss = loss + out_lm.aux_loss / len(batches)
                # DDP averages gradients over ranks; the loss is already a global mean, so undo that average.
                accelerator.backward(loss * accelerator.num_processes)
            loss_sums += torch.stack([s.detach().float() for s in sums])

        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, train.max_grad_norm)
        balance = update_expert_bias(unwrapped, recipe.model.expert_bias_update)

        done = step + 1
        means = accelerator.reduce(loss_sums, reduction="sum") / global_counts.clamp(min=1)
        seconds = timer.lap()
        tokens = sum(int(b["loss_mask"].numel()) for b in batches) * accelerator.num_processes
        values: dict[str, Any] = {
            "loss": float(means[0] + (recipe.model.mtp.weight * means[1:].mean() if mtp_depth else 0.0)),
            "main_loss": float(means[0]),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / seconds,
            "target_tokens": int(global_counts[0]),
            "epoch": step / epoch_steps,
        }
        values.update(balance)
        if mtp_depth:
            values["mtp_loss"] = float(means[1:].mean())
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        progress.step(
            done, values, {"loss": f"{values['loss']:.4f}", "tok/s": f"{values['tokens_per_s']:.0f}"}
        )
        if checkpointer.due(done, total_steps):
            checkpointer.save(done, {"epoch": values["epoch"]})
    progress.close()

    model_dir = save_final_model(
        accelerator, model, tokenizer, out, SFT_REPORT_PANELS, f"SFT — {recipe.output_dir}"
    )
    accelerator.end_training()
    return model_dir


def _one_sample_per_row(samples: TokenizedSamples, capacity: int) -> PackPlan:
    n = len(samples)
    return PackPlan(
        bin_offsets=np.arange(n + 1, dtype=np.int64),
        items=np.arange(n, dtype=np.int64),
        capacity=capacity,
        real_tokens=int(samples.lengths.sum()),
    )
