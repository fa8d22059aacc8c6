"""TRL's SFTTrainer or GRPOTrainer on a posttrain recipe: bench/smollm2_chain.py's `trl_sft` and `trl_grpo`.

The recipe is read (with key=value overrides) by posttrain's own loader, so TRL gets exactly the settings the
posttrain run of the same phase gets; each is mapped to its TRL argument below. Writes <output_dir>/model (weights
and tokenizer) and <output_dir>/trl_summary.json: seconds per step (from one step's end to the next, generation
included), peak GPU memory
(torch.cuda.max_memory_allocated; none on CPU) and what TRL logged each step (loss, rewards, lengths).

    python bench/smollm2_trl.py sft recipes/smollm2/sft_cold_start.yaml model.path=runs/base output_dir=runs/trl_sft
    python bench/smollm2_trl.py grpo recipes/smollm2/grpo_vllm.yaml model.path=runs/sft/model output_dir=runs/trl_grpo

sft (SFTTrainer), from sft_cold_start.yaml:
  data.train messages             prompt-completion rows (the last assistant turn is the completion), so that
                                  TRL's completion_only_loss trains on the assistant's tokens as data.loss_on
                                  = assistant does (TRL's assistant_only_loss needs {% generation %} markers,
                                  which SmolLM2's chat template lacks)
  packing.capacity                max_length, with packing=True, packing_strategy="bfd", padding_free=True
  data.max_seq_len                no equivalent: TRL's BFD truncates a sample only at the pack length (the
                                  tier's samples are far shorter than either)
  train.micro_batch_size          per_device_train_batch_size (packs)
  train.grad_accum                gradient_accumulation_steps
  train.max_steps, lr, seed       max_steps, learning_rate, seed
  train.min_lr, warmup_steps      lr_scheduler_type="cosine_with_min_lr" (lr_scheduler_kwargs min_lr),
                                  warmup_steps. transformers warms up from 0 (step/W) and decays over T - W
                                  steps; posttrain warms up from 1/W ((s + 1)/W) and decays over T - W - 1
  train.betas, weight_decay       adam_beta1/adam_beta2 (posttrain's 0.95, not TRL's 0.999), weight_decay
  train.max_grad_norm             max_grad_norm
  mixed precision "auto"          bf16=True on CUDA (fp32 weights, bf16 autocast), fp32 on CPU
  (no recipe key)                 torch_compile with --torch-compile (the chain's --trl-compile), else off
  attention                       posttrain's varlen kernel (`posttrain_varlen`, the kernel flash-attention's
                                  varlen path runs), which TRL's padding-free rows reach through position_ids
  train.loss_chunk_size           no equivalent (TRL materialises the logits; use_liger_kernel would not)
grpo (GRPOTrainer), from grpo_vllm.yaml:
  data.train prompts + answer     the dataset as it is; the rewards read `answer`
  rewards.functions, weights      reward_funcs (posttrain's functions, unchanged), reward_weights
  grpo.prompts_per_step x G       gradient_accumulation_steps * per_device_train_batch_size completions per
                                  optimizer step, one generation batch per step (steps_per_generation =
                                  gradient_accumulation_steps); num_generations = G
  grpo.micro_batch_size           per_device_train_batch_size (completions per forward/backward)
  grpo.num_iterations             num_iterations
  grpo.loss                       loss_type, epsilon, epsilon_high, beta, scale_rewards,
                                  importance_sampling_level, mask_truncated_completions
  grpo.loss.tis_cap               no equivalent without vLLM: TRL's transformers generation returns no sampler
                                  log-probabilities, so there is no truncated importance sampling (posttrain's
                                  hf sampler is the fp32 module, the trainer bf16 autocast: posttrain corrects
                                  that gap, TRL does not see it)
  generation.max_tokens           max_completion_length
  generation.temperature, top_p   temperature, top_p
  generation.stop                 none needed: SmolLM2's EOS is "<|im_end|>", which ends generation anyway
  generation.backend              TRL's transformers `generate` path (use_vllm=False); with --continuous-batching,
                                  transformers' continuous batching (use_transformers_continuous_batching)
  train.*                         as for sft (GRPO recipe: constant lr, no warm-up)
  attention                       padded rows unpadded by their mask into posttrain's varlen kernel
                                  (`posttrain_varlen_unpad`: what flash-attention does for TRL users), cached
                                  decoding by SDPA over the padding mask. With plain sdpa, one H200 run went to
                                  grad_norm nan at step 19 (then a device-side assert in sampling)
  data.eval / eval.*              no equivalent wired here: the chain scores the saved model afterwards
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# bench/rewards.py would shadow the `rewards` package: import from the repository root, not from bench/.
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["sft", "grpo"])
    p.add_argument("recipe", help="a posttrain recipe (sft: SFTRecipe, grpo: GRPORecipe)")
    p.add_argument("overrides", nargs="*", help="key=value, as on the posttrain command line")
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N rows of data.train")
    p.add_argument(
        "--continuous-batching",
        action="store_true",
        help="grpo: transformers' continuous batching instead of generate",
    )
    p.add_argument(
        "--torch-compile",
        action="store_true",
        help="TrainingArguments.torch_compile: TRL's compiled step, as its users switch it on",
    )
    p.add_argument(
        "--stop-after-s",
        type=float,
        default=None,
        help="end training after the step that passes this many seconds of training (the model is still saved)",
    )
    return p.parse_args(argv)


def common_args(train, output_dir: Path, torch_compile: bool = False) -> dict:  # noqa: ANN001 (TrainSection)
    """TRL (transformers TrainingArguments) settings for a posttrain `train` section: warm-up, then cosine decay
    to min_lr, or a constant lr when min_lr = lr, as posttrain schedules it; `torch_compile` as asked."""
    import torch

    cuda = torch.cuda.is_available()
    schedule = (
        {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": train.min_lr}}
        if train.min_lr < train.lr
        else {"lr_scheduler_type": "constant"}
    )
    return {
        "output_dir": str(output_dir / "trl"),
        "max_steps": train.max_steps,
        "learning_rate": train.lr,
        **schedule,
        "warmup_steps": train.warmup_steps,
        "adam_beta1": train.betas[0],
        "adam_beta2": train.betas[1],
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm or 0.0,
        "seed": train.seed,
        "bf16": cuda,
        "use_cpu": not cuda,
        "optim": "adamw_torch_fused" if cuda else "adamw_torch",
        "gradient_checkpointing": train.gradient_checkpointing,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "torch_compile": torch_compile,
    }


def read_rows(sources: list[str], limit: int | None) -> list[dict]:
    rows = [
        json.loads(line) for source in sources for line in (ROOT / source).read_text().splitlines() if line
    ]
    return rows[:limit] if limit else rows


def build_sft(recipe, output_dir: Path, args: argparse.Namespace):  # noqa: ANN001, ANN201
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from posttrain.fast.attention import register_varlen_attention

    if recipe.data.loss_on != "assistant":
        raise SystemExit("only data.loss_on=assistant is mapped")
    train = recipe.train
    rows = [
        {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
        for r in read_rows(recipe.data.train, args.max_samples)
    ]
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.path, attn_implementation=register_varlen_attention(), dtype="float32"
    )
    config = SFTConfig(
        **common_args(train, output_dir, args.torch_compile),
        per_device_train_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        max_length=recipe.packing.capacity or recipe.data.max_seq_len,
        completion_only_loss=True,
    )
    return SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def build_grpo(recipe, output_dir: Path, args: argparse.Namespace):  # noqa: ANN001, ANN201
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.algorithms.grpo import GRPOLossConfig
    from rewards.registry import get

    if any(item.kwargs for item in recipe.rewards.functions):
        raise SystemExit("reward kwargs are not mapped")
    grpo, loss = recipe.grpo, GRPOLossConfig(**recipe.grpo.loss)  # posttrain's defaults for unset keys
    completions = grpo.prompts_per_step * grpo.num_generations
    micro = min(grpo.micro_batch_size, completions)
    if completions % micro:
        raise SystemExit(f"{completions} completions per step do not split into micro-batches of {micro}")
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    from posttrain.fast.attention import UNPAD_VARLEN_ATTENTION, register_varlen_attention

    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.path, attn_implementation=UNPAD_VARLEN_ATTENTION, dtype="float32"
    )
    config = GRPOConfig(
        **common_args(recipe.train, output_dir, args.torch_compile),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // micro,
        num_generations=grpo.num_generations,
        num_iterations=grpo.num_iterations,
        max_completion_length=recipe.generation.max_tokens,
        temperature=recipe.generation.temperature,
        top_p=recipe.generation.top_p,
        reward_weights=[item.weight for item in recipe.rewards.functions],
        loss_type=loss.loss_type,
        epsilon=loss.epsilon,
        epsilon_high=loss.epsilon_high,
        beta=loss.beta,
        scale_rewards=loss.scale_rewards,
        importance_sampling_level=loss.importance_sampling_level,
        mask_truncated_completions=loss.mask_truncated_completions,
        use_vllm=False,
        use_transformers_continuous_batching=args.continuous_batching,
    )
    return GRPOTrainer(
        model=model,
        args=config,
        reward_funcs=[get(item.name) for item in recipe.rewards.functions],
        train_dataset=Dataset.from_list(read_rows(recipe.data.train, args.max_samples)),
        processing_class=tokenizer,
    )


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import TrainerCallback

    from posttrain.config import GRPORecipe, SFTRecipe, load_recipe

    args = parse_args(argv)
    schema = SFTRecipe if args.kind == "sft" else GRPORecipe
    recipe = load_recipe(args.recipe, schema, args.overrides)
    output_dir = Path(recipe.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.train.seed)
    trainer = (build_sft if args.kind == "sft" else build_grpo)(recipe, output_dir, args)
    cuda = torch.cuda.is_available()

    step_seconds: list[float] = []

    class Clock(TrainerCallback):
        """Seconds from one optimizer step's end to the next (the first: from the start of training); stops
        training once --stop-after-s have passed."""

        def on_train_begin(self, *_, **__):  # noqa: ANN002, ANN003, ANN202
            self.first = self.last = time.perf_counter()

        def on_step_end(self, _args, _state, control, **__):  # noqa: ANN001, ANN003, ANN202
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_seconds.append(now - self.last)
            self.last = now
            if args.stop_after_s is not None and now - self.first > args.stop_after_s:
                control.should_training_stop = True

    trainer.add_callback(Clock())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    trainer.save_model(str(output_dir / "model"))
    trainer.processing_class.save_pretrained(str(output_dir / "model"))
    logged = [
        {k: v for k, v in entry.items() if isinstance(v, int | float)}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    summary = {
        "kind": args.kind,
        "steps": len(step_seconds),
        "train_s": train_s,
        "step_s": step_seconds,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "log": logged,
    }
    (output_dir / "trl_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[trl {args.kind}: {summary['steps']} steps in {train_s:.1f} s]")
    return summary


if __name__ == "__main__":
    main()
