"""GRPO (DeepSeekMath §4, DeepSeek-R1 §2.2): sample G completions per prompt, score them, and move the policy
toward the better ones relative to their group — no critic.

One step of this trainer (the loop of `train_grpo`) reads top to bottom:
  1. rollouts: the backend samples G completions for each prompt of the step (this rank's share);
  2. rewards: the recipe's reward functions score them in worker processes (failures are None, never 0) —
     both in `posttrain.rollouts.collect_rollouts` (dynamic sampling refills flat groups there);
  3. advantages: group-relative, from `posttrain.algorithms.grpo`;
  4. log-probs: the trainer's own log-probs of the sampled tokens before any update (π_old, also compared
     with the sampler's to measure the rollout gap), and the reference's when β > 0, over the micro-batch
     layout the recipe asks for (padded rows, packed rows, shared prompt: `grpo_layouts`);
  5. μ optimisation passes over the rollout batch, each one optimiser step (`micro_batch_loss`);
  6. sync: the new weights are pushed into the backend, metrics written, checkpoints taken.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from posttrain.algorithms.grpo import GRPOLossConfig, group_advantages, grpo_loss, loss_token_mask
from posttrain.config import GRPORecipe, RecipeError
from posttrain.data.prompts import PromptSet, load_prompts
from posttrain.generation.factory import make_backend
from posttrain.generation.perturbed import PerturbedSampler
from posttrain.policy import Policy, build_policy, load_tokenizer
from posttrain.rollouts import RolloutBatch, collect_rollouts, evaluate, make_reward_runner
from posttrain.samples import GRPO_NO_SIGNAL, NoSignalAlarm, SampleLog
from posttrain.trainers.grpo_layouts import (
    MicroBatch,
    check_pack_tokens,
    completion_logprobs,
    completion_tensors,
    frozen_logprobs,
    micro_batches,
)
from posttrain.trainers.loop import (
    Checkpointer,
    Progress,
    apply_memory_and_speed_switches,
    autocast_dtype,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    prepare_output_dir,
    save_final_model,
    update_expert_bias,
)

log = logging.getLogger(__name__)

GRPO_REPORT_PANELS = [
    "reward/mean",
    ("eval/accuracy",),
    "loss",
    "kl",
    ("completion_length/mean", "completion_length/max"),
    ("gap/mean_abs", "gap/max_abs"),
    ("tis/weight_mean", "tis/capped_frac", "off_policy/masked_frac"),
    ("clip_ratio/low_mean", "clip_ratio/high_mean"),
    "frac_zero_variance_groups",
    "entropy",
]


def micro_batch_loss(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    micro: MicroBatch,
    advantages: torch.Tensor,
    loss_cfg: GRPOLossConfig,
    counts: torch.Tensor,
    temperature: float,
    chunk_size: int | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    reward_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`grpo_loss` of one micro-batch (its share of the step's loss, normalised by the global token and sequence
    `counts`, so summing over micro-batches gives the step's loss) and its metrics, with the mean entropy.

    advantages, old_logps, ref_logps, reward_valid and the tensors are the step's [N, ...] ones; the sampler's
    log-probs and the truncation flags are used when `tensors` holds them.
    """
    rows = micro.sequences
    logps, entropy = completion_logprobs(model, tensors, micro, temperature, chunk_size)
    completion_mask = tensors["completion_mask"][rows]
    loss, metrics = grpo_loss(
        logps,
        advantages[rows],
        completion_mask,
        loss_cfg,
        old_logps=None if old_logps is None else old_logps[rows],
        ref_logps=None if ref_logps is None else ref_logps[rows],
        sampler_logps=tensors["sampler_logps"][rows] if "sampler_logps" in tensors else None,
        reward_valid=None if reward_valid is None else reward_valid[rows],
        is_truncated=tensors["is_truncated"][rows] if "is_truncated" in tensors else None,
        num_tokens_global=counts[0],
        num_sequences_global=counts[1],
    )
    metrics["entropy"] = (entropy.detach() * completion_mask).sum() / completion_mask.sum().clamp(min=1)
    return loss, metrics


def step_prompt_ids(step: int, n_prompts: int, per_step: int, seed: int) -> np.ndarray:
    """Prompt indices of GRPO step `step`: a seeded permutation per epoch, wrapped at the end of an epoch."""
    steps_per_epoch = max(1, n_prompts // per_step)
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_prompts)
    return order[k * per_step : (k + 1) * per_step]


def train_grpo(recipe: GRPORecipe, resume: bool = False) -> Path:
    accelerator = make_accelerator(recipe.train)
    out = prepare_output_dir(recipe.output_dir, recipe, accelerator, resume)
    tokenizer = load_tokenizer(recipe.model)
    data = recipe.data
    prompts = load_prompts(
        data.train, tokenizer, data.prompt_field, data.system_prompt, data.max_prompt_tokens
    )
    eval_prompts = (
        load_prompts(data.eval, tokenizer, data.prompt_field, data.system_prompt) if data.eval else None
    )
    if eval_prompts is not None and recipe.eval.max_prompts:
        eval_prompts = eval_prompts.select(list(range(min(recipe.eval.max_prompts, len(eval_prompts)))))

    grpo = recipe.grpo
    if grpo.pack_tokens is not None:  # fail now, not at the first long rollout
        check_pack_tokens(recipe, prompts)
    world, rank = accelerator.num_processes, accelerator.process_index
    if grpo.prompts_per_step % world:
        raise RecipeError(
            f"grpo.prompts_per_step ({grpo.prompts_per_step}) must divide over {world} processes"
        )
    local_prompts = grpo.prompts_per_step // world
    loss_cfg = GRPOLossConfig(**{"max_completion_length": recipe.generation.max_tokens, **grpo.loss})
    total_steps = recipe.train.max_steps or max(
        1, math.ceil(recipe.train.epochs * len(prompts) / grpo.prompts_per_step)
    )
    temperature = recipe.generation.temperature or 1.0
    chunk = recipe.train.loss_chunk_size

    decodes_with_policy = recipe.generation.backend in ("auto", "hf", "latent")
    if recipe.train.compile_blocks is True and decodes_with_policy:
        raise RecipeError(
            "train.compile_blocks with generation.backend "
            f"{recipe.generation.backend!r}: that backend decodes with the trainer's own (then compiled) module, "
            "one recompilation per new shape; use generation.backend=vllm or leave train.compile_blocks off"
        )
    policy = build_policy(recipe.model)
    if grpo.share_prompt and not policy.takes_dense_mask:
        raise RecipeError(
            "grpo.share_prompt needs attention that takes a dense mask: set model.attn_implementation=sdpa "
            f"(the model attends with {policy.attention_implementation!r}) or leave grpo.share_prompt off"
        )
    reference = _make_reference(policy, loss_cfg.beta)
    apply_memory_and_speed_switches(policy, recipe.train, decodes_with_policy)
    optimizer = make_optimizer(list(policy.parameters()), recipe.train)
    scheduler = make_scheduler(optimizer, recipe.train, total_steps * grpo.num_iterations)
    model, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    unwrapped: Policy = accelerator.unwrap_model(model)
    checkpointer = Checkpointer(accelerator, out, recipe.checkpoint)
    start_step = 0
    if resume and (state := checkpointer.restore_latest()):
        start_step = state["step"]
        if reference is not None and state.get("reference_refreshed_at"):
            reference.load_state_dict(unwrapped.state_dict())
    precision = autocast_dtype(accelerator)  # rollouts sampled in the precision they are scored in
    backend = make_backend(recipe.generation, unwrapped.model, tokenizer, out, precision)
    eval_backend = backend
    if (perturbation := recipe.generation.sampler_perturbation) is not None:
        backend = PerturbedSampler(
            eval_backend,
            unwrapped.model,
            lambda noisy: make_backend(recipe.generation, noisy, tokenizer, out / "perturbed", precision),
            perturbation.temperature_factor,
            perturbation.weight_noise,
            perturbation.logit_bias_std,
            perturbation.seed,
        )
    if start_step:
        backend.sync_weights(unwrapped.model)
    runner = make_reward_runner(recipe.rewards)
    progress = Progress(accelerator, out, recipe.logging, total_steps, start_step)
    sample_log = SampleLog(out, recipe.logging.samples, grpo.num_generations, keep_through=start_step)
    no_signal = NoSignalAlarm(GRPO_NO_SIGNAL)

    if eval_prompts is not None and start_step == 0 and accelerator.is_main_process:
        progress.metrics.write(
            0, evaluate(eval_backend, runner, eval_prompts, recipe.generation, recipe.eval)
        )

    reference_refreshed_at = 0
    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        ids = step_prompt_ids(step, len(prompts), grpo.prompts_per_step, recipe.train.seed)
        mine = prompts.select([int(i) for i in ids[rank * local_prompts : (rank + 1) * local_prompts]])
        refill = (
            _refill_prompts(prompts, ids, step, recipe.train.seed, rank, world)
            if grpo.dynamic_sampling
            else None
        )
        model.eval()
        batch, stats = collect_rollouts(
            backend, runner, mine, recipe, recipe.generation.seed + step * 1009 + rank, refill
        )
        if accelerator.is_main_process:  # what the model writes, and a warning when rewards cannot rank it
            texts = [c.text for c in batch.completions]
            sample_log.write(
                step + 1, batch.prompts.messages, texts, batch.rewards.tolist(), batch.per_function
            )
            no_signal.update(stats["frac_zero_variance_groups"])
        tensors = completion_tensors(batch, tokenizer.pad_token_id, accelerator.device)
        advantages, valid = group_advantages(batch.rewards, grpo.num_generations, loss_cfg.scale_rewards)
        advantages, valid = advantages.float().to(accelerator.device), valid.to(accelerator.device)

        batches = micro_batches(
            tensors,
            grpo.micro_batch_size,
            grpo.pack_tokens,
            grpo.num_generations if grpo.share_prompt else None,
        )
        needs_old = grpo.num_iterations > 1 or loss_cfg.off_policy_mask_threshold is not None
        with accelerator.autocast():
            old_logps = frozen_logprobs(model, tensors, batches, temperature, chunk) if needs_old else None
            ref_logps = None
            if reference is not None:
                ref_logps = frozen_logprobs(reference, tensors, batches, temperature, chunk)
            elif loss_cfg.beta > 0:  # LoRA: the base model is the policy with its adapters switched off
                with unwrapped.model.disable_adapter():
                    ref_logps = frozen_logprobs(model, tensors, batches, temperature, chunk)
        mask, _ = loss_token_mask(
            tensors["completion_mask"],
            loss_cfg,
            advantages,
            valid,
            tensors["is_truncated"],
            old_logps,
            tensors["sampler_logps"],
        )
        counts = accelerator.reduce(
            torch.stack([mask.sum(), torch.tensor(len(mask), device=mask.device)]), "sum"
        )

        model.train()
        pass_metrics: list[dict[str, float]] = []
        for _ in range(grpo.num_iterations):
            sums: dict[str, float] = {"loss": 0.0}
            for j, micro in enumerate(batches):
                sync = nullcontext() if j == len(batches) - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    loss, metrics = micro_batch_loss(
                        model,
                        tensors,
                        micro,
                        advantages,
                        loss_cfg,
                        counts,
                        temperature,
                        chunk,
                        old_logps=old_logps,
                        ref_logps=ref_logps,
                        reward_valid=valid,
                    )
                    accelerator.backward(loss * world)
                sums["loss"] += float(loss.detach())  # already a share of the global loss
                weight = len(micro.sequences) / len(mask)  # metrics are micro-batch means
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * weight
            grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, recipe.train.max_grad_norm)
            if grad_norm is not None:
                sums["grad_norm"] = grad_norm
            sums.update(update_expert_bias(unwrapped, recipe.model.expert_bias_update))
            pass_metrics.append(sums)
        t_sync = time.perf_counter()
        backend.sync_weights(unwrapped.model)
        stats["time/sync_s"] = time.perf_counter() - t_sync
        if reference is not None and grpo.ref_refresh_every and (step + 1) % grpo.ref_refresh_every == 0:
            reference.load_state_dict(unwrapped.state_dict())
            reference_refreshed_at = step + 1

        done = step + 1
        values = {**{k: float(np.mean([m[k] for m in pass_metrics])) for k in pass_metrics[0]}, **stats}
        values.update(_rollout_metrics(batch, tensors))
        values["lr"] = scheduler.get_last_lr()[0]
        values["time/step_s"] = time.perf_counter() - t_step
        if (
            eval_prompts is not None
            and recipe.eval.every
            and done % recipe.eval.every == 0
            and accelerator.is_main_process
        ):
            values.update(evaluate(eval_backend, runner, eval_prompts, recipe.generation, recipe.eval))
        progress.step(
            done,
            values,
            {"reward": f"{values['reward/mean']:.3f}", "len": f"{values['completion_length/mean']:.0f}"},
        )
        if checkpointer.due(done, total_steps):
            checkpointer.save(done, {"reference_refreshed_at": reference_refreshed_at})

    if eval_prompts is not None and accelerator.is_main_process:
        final = evaluate(eval_backend, runner, eval_prompts, recipe.generation, recipe.eval)
        progress.metrics.write(total_steps, final)
        log.info("held-out after GRPO: %s", final)
    progress.close()
    runner.close()
    backend.close()
    if eval_backend is not backend:
        eval_backend.close()
    return save_final_model(
        accelerator, model, tokenizer, out, GRPO_REPORT_PANELS, f"GRPO — {recipe.output_dir}"
    )


def _make_reference(policy: Policy, beta: float) -> torch.nn.Module | None:
    """β = 0: no reference at all. With LoRA the base model (adapters off) is the reference: no second copy."""
    if beta == 0 or hasattr(policy.model, "disable_adapter"):
        return None
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    return reference


def _refill_prompts(
    prompts: PromptSet, used: np.ndarray, step: int, seed: int, rank: int, world: int
) -> PromptSet:
    """Prompts not in this step's batch, in a seeded order private to (step, rank)."""
    rest = np.setdiff1d(np.arange(len(prompts)), used)
    order = np.random.default_rng([seed, step, rank, 17]).permutation(rest)
    return prompts.select([int(i) for i in order[rank::world]])


def _rollout_metrics(batch: RolloutBatch, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    lengths = tensors["completion_mask"].sum(1).float()
    rewards = batch.rewards.numpy()
    metrics = {
        "reward/mean": float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan"),
        "reward/std": float(np.nanstd(rewards)) if np.isfinite(rewards).any() else float("nan"),
        "reward/none_count": float(np.isnan(rewards).sum()),
        "reward/failures": float(batch.failures),
        "completion_length/mean": float(lengths.mean()),
        "completion_length/max": float(lengths.max()),
        "truncation_rate": float(tensors["is_truncated"].float().mean()),
    }
    for name, values in batch.per_function.items():
        present = [v for v in values if v is not None]
        metrics[f"reward/{name}"] = float(np.mean(present)) if present else float("nan")
    return metrics
