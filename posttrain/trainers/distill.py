"""Distillation into a small dense student (DeepSeek-R1 §2.4; DeepSeek-V3 §5.1): supervised fine-tuning on a
teacher's accepted traces, optionally with logit distillation when teacher and student share a tokenizer.

`posttrain distill RECIPE.yaml`:
  1. the student is scored on held-out prompts with the recipe's rewards (greedy decoding): accuracy before;
  2. without `kd`, the SFT trainer runs as it is on the traces (packing, sample masking, optional MTP);
     with `kd`, the same packed steps add a divergence to the teacher's next-token distribution, computed on
     the fly by a frozen teacher in no_grad next to the student:

         L = (1 − α) · L_SFT + α · τ² · L_KD,   L_KD = 1/N Σ_{target tokens} D(p_T^τ ‖ p_S^τ)

     with D = forward KL or generalized JSD(β) (posttrain.algorithms.distill) and N the step's target tokens,
     so micro-batches and ranks add up to the full-batch loss (as in SFT); τ² keeps gradient scale (Hinton);
  3. the trained student is scored again: accuracy after. Both land in `<output_dir>/eval.json`.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from pydantic import Field, model_validator

from posttrain.algorithms.distill import distillation_loss
from posttrain.algorithms.sft import mtp_combined_loss, token_cross_entropy_sum
from posttrain.config import (
    AccuracyEvalSection,
    CheckpointSection,
    DataSection,
    GenerationSection,
    LoggingSection,
    ModelSection,
    PackingSection,
    RecipeError,
    RewardsSection,
    Section,
    SFTRecipe,
    TrainSection,
)
from posttrain.data.prompts import load_prompts
from posttrain.data.trace_runs import trace_sources
from posttrain.generation.factory import make_backend
from posttrain.policy import Policy, build_policy, compute_dtype, load_causal_lm, load_tokenizer
from posttrain.rollouts import evaluate, make_reward_runner
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
    refuse_existing_run,
    save_final_model,
)
from posttrain.trainers.sft import mtp_depth_of, packed_sft_data, step_batches, steps_per_epoch, train_sft

log = logging.getLogger(__name__)

KD_REPORT_PANELS = ["loss", "sft_loss", "kd_loss", "lr", "tokens_per_s", "grad_norm"]


class KDSection(Section):
    """Logit distillation from a teacher that shares the student's tokenizer."""

    teacher: ModelSection
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, gt=0, lt=1, description="β of the generalized JSD")
    temperature: float = Field(1.0, gt=0, description="τ applied to both teacher and student logits")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term; 1 - alpha weighs the SFT loss")


class DistillEvalSection(AccuracyEvalSection):
    prompts: list[str] = Field([], description="held-out prompt files (prompt + reward columns)")
    prompt_field: str = "prompt"
    max_prompts: int | None = Field(None, gt=0)


class DistillRecipe(Section):
    model: ModelSection = Field(..., description="the student")
    data: DataSection = Field(..., description="train: trace run directories or SFT files")
    packing: PackingSection = PackingSection()
    train: TrainSection = TrainSection()
    kd: KDSection | None = None
    generation: GenerationSection = GenerationSection(temperature=0.0)
    rewards: RewardsSection | None = None
    eval: DistillEvalSection = DistillEvalSection()
    logging: LoggingSection = LoggingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    output_dir: str

    @model_validator(mode="after")
    def _eval_needs_rewards(self) -> DistillRecipe:
        if self.eval.prompts and self.rewards is None:
            raise ValueError("eval.prompts are scored with `rewards`: add a rewards section")
        return self


def sft_recipe(recipe: DistillRecipe) -> SFTRecipe:
    data = recipe.data.model_copy(update={"train": trace_sources(recipe.data.train)})
    return SFTRecipe(
        model=recipe.model,
        data=data,
        packing=recipe.packing,
        train=recipe.train,
        logging=recipe.logging,
        checkpoint=recipe.checkpoint,
        output_dir=recipe.output_dir,
    )


def evaluate_student(model: torch.nn.Module | str | Path, tokenizer: object, recipe: DistillRecipe) -> dict:
    """Greedy decoding on the held-out prompts, scored by the recipe's rewards (the GRPO evaluation). A teacher
    (posttrain's DeepSeek-V3 too) is scored the same way: `generation.backend` auto picks its decoder. The student
    decodes in the precision it trained in: bf16 autocast on a GPU when `model.dtype` is auto (`compute_dtype`)."""
    if isinstance(model, str | Path):
        model = load_causal_lm(ModelSection(path=str(model), dtype="float32", attn_implementation="sdpa"))
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    prompts = load_prompts(recipe.eval.prompts, tokenizer, recipe.eval.prompt_field)
    if recipe.eval.max_prompts:
        prompts = prompts.select(list(range(min(recipe.eval.max_prompts, len(prompts)))))
    backend = make_backend(
        recipe.generation, model, tokenizer, Path(recipe.output_dir), compute_dtype(recipe.model)
    )
    with make_reward_runner(recipe.rewards) as runner:
        return {
            **evaluate(backend, runner, prompts, recipe.generation, recipe.eval),
            "eval/prompts": len(prompts),
        }


def train_distill(recipe: DistillRecipe, resume: bool = False) -> Path:
    """Evaluate, train (SFT, or SFT + logit distillation), evaluate again; returns the saved student."""
    refuse_existing_run(recipe.output_dir, resume)  # before the first evaluation, not after it
    out = Path(recipe.output_dir)
    sft = sft_recipe(recipe)
    results_path = out / "eval.json"
    results = json.loads(results_path.read_text()) if resume and results_path.exists() else {}
    evaluating = bool(recipe.eval.prompts) and PartialState().is_main_process  # one process evaluates
    if evaluating and "before" not in results:
        set_seed(recipe.train.seed)  # the initial weights train_sft starts from, for a randomly built student
        results["before"] = evaluate_student(
            load_causal_lm(recipe.model), load_tokenizer(recipe.model), recipe
        )
        out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
        log.info("held-out before distillation: %s", results["before"])
    model_dir = train_sft(sft, resume) if recipe.kd is None else train_with_kd(sft, recipe.kd, resume)
    if evaluating:
        results["after"] = evaluate_student(str(model_dir), load_tokenizer(recipe.model), recipe)
        results_path.write_text(json.dumps(results, indent=2))
        log.info("held-out after distillation: %s", results["after"])
    return model_dir


def check_same_tokenizer(student: ModelSection, teacher: ModelSection) -> None:
    student_vocab = load_tokenizer(student).get_vocab()
    if load_tokenizer(teacher).get_vocab() != student_vocab:
        raise RecipeError(
            "kd.teacher's tokenizer differs from the student's: logit distillation compares distributions "
            "over the same token ids; use SFT on the traces alone (remove `kd`)"
        )


def train_with_kd(recipe: SFTRecipe, kd: KDSection, resume: bool = False) -> Path:
    """The SFT trainer's packed steps (its data, schedule, checkpoints and resume) plus the KD term."""
    check_same_tokenizer(recipe.model, kd.teacher)
    accelerator = make_accelerator(recipe.train)
    out = prepare_output_dir(recipe.output_dir, recipe, accelerator, resume)
    tokenizer = load_tokenizer(recipe.model)
    dataset, _ = packed_sft_data(recipe, tokenizer, accelerator)

    policy = build_policy(recipe.model)
    apply_memory_and_speed_switches(policy, recipe.train)
    mtp_depth = mtp_depth_of(policy, recipe)
    teacher = Policy(load_causal_lm(kd.teacher)).eval().requires_grad_(False).to(accelerator.device)
    train = recipe.train
    world = accelerator.num_processes
    total_steps = train.max_steps or max(1, math.ceil(train.epochs * steps_per_epoch(dataset, train, world)))
    optimizer = make_optimizer(list(policy.parameters()), train)
    scheduler = make_scheduler(optimizer, train, total_steps)
    model, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    checkpointer = Checkpointer(accelerator, out, recipe.checkpoint)
    start_step = 0
    if resume and (state := checkpointer.restore_latest()):
        start_step = state["step"]
    progress = Progress(accelerator, out, recipe.logging, total_steps, start_step)
    timer = StepTimer()

    for step in range(start_step, total_steps):
        batches, targets, global_counts = step_batches(dataset, step, train, accelerator, mtp_depth)
        sums = torch.zeros(
            3, device=accelerator.device
        )  # loss, SFT loss, KD loss: shares of the step's means
        model.train()
        for i, (batch, batch_targets) in enumerate(zip(batches, targets, strict=True)):
            sync = nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                student = model(batch["input_ids"], batch["position_ids"], with_mtp=mtp_depth > 0)
                ce = [token_cross_entropy_sum(student.logits, batch_targets[0])[0]]
                ce += [
                    token_cross_entropy_sum(lg, t[:, : lg.shape[1]])[0]
                    for lg, t in zip(student.mtp_logits, batch_targets[1:])
                ]
                sft_loss = mtp_combined_loss(
                    ce[0], global_counts[0], ce[1:], list(global_counts[1:]), recipe.model.mtp.weight
                )
                with torch.no_grad():
                    teacher_logits = teacher(batch["input_ids"], batch["position_ids"]).logits
                kd_loss = distillation_loss(
                    student.logits,
                    batch_targets[0] != -100,
                    teacher_logits=teacher_logits,
                    divergence=kd.divergence,
                    beta=kd.beta,
                    temperature=kd.temperature,
                    num_tokens_global=global_counts[0],
                )
                loss = (1 - kd.alpha) * sft_loss + kd.alpha * kd.temperature**2 * kd_loss
                accelerator.backward(loss * world)  # DDP averages over ranks; the loss is a global mean
            sums += torch.stack([loss.detach(), sft_loss.detach(), kd_loss.detach()]).float()
        grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, train.max_grad_norm)

        done = step + 1
        means = accelerator.reduce(sums, reduction="sum")
        tokens = sum(int(b["loss_mask"].numel()) for b in batches) * world
        values = {
            "loss": float(means[0]),
            "sft_loss": float(means[1]),
            "kd_loss": float(means[2]),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / timer.lap(),
        }
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        progress.step(done, values, {"loss": f"{values['loss']:.4f}", "kd": f"{values['kd_loss']:.4f}"})
        if checkpointer.due(done, total_steps):
            checkpointer.save(done, {})
    progress.close()

    model_dir = save_final_model(
        accelerator, model, tokenizer, out, KD_REPORT_PANELS, f"Distillation — {recipe.output_dir}"
    )
    accelerator.end_training()
    return model_dir
