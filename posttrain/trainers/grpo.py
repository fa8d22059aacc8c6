"""GRPO (DeepSeekMath §4, DeepSeek-R1 §2.2): sample G completions per prompt, score them, and move the policy
toward the better ones relative to their group — no critic.

One step of this trainer reads top to bottom:
  1. rollouts: the backend samples G completions for each prompt of the step (this rank's share);
  2. rewards: the recipe's reward functions score them in worker processes (failures are None, never 0);
  3. advantages: group-relative, from `posttrain.algorithms.grpo` (dynamic sampling drops flat groups);
  4. log-probs: the trainer's own log-probs of the sampled tokens before any update (π_old, also compared
     with the sampler's to measure the rollout gap), and the reference's when β > 0;
  5. μ optimisation passes over the rollout batch, each one optimiser step;
  6. the new weights are pushed into the backend, metrics written, checkpoints taken.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.algorithms.grpo import (
    GRPOLossConfig,
    group_advantages,
    grpo_loss,
    loss_token_mask,
    zero_variance_groups,
)
from posttrain.config import GenerationSection, GRPORecipe
from posttrain.data.packing import plan_packs
from posttrain.data.prompts import PromptSet, load_prompts
from posttrain.fast.chunked_loss import chunked_token_logprobs
from posttrain.generation.base import Backend, Completion, SamplingParams, build_backend
from posttrain.generation.perturbed import PerturbedSampler
from posttrain.policy import Policy, build_policy, load_tokenizer
from posttrain.report import write_report
from posttrain.trainers.loop import (
    Checkpointer,
    Progress,
    apply_memory_and_speed_switches,
    make_accelerator,
    make_optimizer,
    make_reward_runner,
    make_scheduler,
    prepare_output_dir,
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


@dataclass
class RolloutBatch:
    """G completions for each of a step's prompts, flattened prompt-major, scored."""

    prompts: PromptSet  # one row per completion (each prompt repeated G times)
    completions: list[Completion]
    rewards: torch.Tensor  # [N], NaN where no reward
    per_function: dict[str, list[float | None]]
    failures: int


def make_backend(
    cfg: GenerationSection,
    policy: Policy,
    tokenizer: Any,
    out: Path,
    module: torch.nn.Module | None = None,
) -> Backend:
    """The rollout engine over `module` (default: the policy's own). `hf` and `latent` generate with that module
    (no copy, nothing to sync); `vllm` starts from a snapshot of it and receives new weights after every step."""
    kind = cfg.backend
    module = _hf_module(policy) if module is None else module
    if kind == "auto":
        kind = "latent" if policy.is_posttrain_model else "hf"
    if kind == "latent":
        if not policy.is_posttrain_model:
            raise ValueError("generation.backend=latent needs posttrain's DeepSeek-V3 (model.implementation)")
        from posttrain.generation.latent import LatentCacheBackend

        return LatentCacheBackend(module, tokenizer, **cfg.options)
    if kind == "hf":
        return build_backend("hf", model=module, tokenizer=tokenizer, **cfg.options)
    if kind == "vllm":
        snapshot = out / "rollout_init"
        module.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        return build_backend("vllm", model_path=str(snapshot), seed=cfg.seed, **cfg.options)
    return build_backend("openai", **cfg.options)


def _hf_module(policy: Policy) -> torch.nn.Module:
    return policy.model


def sampling_params(cfg: GenerationSection, n: int, seed: int, greedy: bool = False) -> SamplingParams:
    return SamplingParams(
        n=n,
        max_tokens=cfg.max_tokens,
        temperature=0.0 if greedy else cfg.temperature,
        top_p=1.0 if greedy else cfg.top_p,
        stop=list(cfg.stop),
        seed=seed,
    )


def score(runner: Any, prompts: PromptSet, completions: list[Completion]) -> tuple[torch.Tensor, dict, int]:
    columns = {**prompts.columns, "completion_ids": [c.token_ids for c in completions]}
    scores = runner.score(prompts.messages, [c.text for c in completions], columns)
    for failure in scores.failures[:5]:
        log.warning(
            "reward %s failed on sample %d: %s", failure.reward, failure.sample, failure.message[:300]
        )
    rewards = torch.tensor([math.nan if r is None else r for r in scores.total], dtype=torch.float64)
    return rewards, scores.per_function, len(scores.failures)


def collect_rollouts(
    backend: Backend, runner: Any, prompts: PromptSet, recipe: GRPORecipe, seed: int, refill: PromptSet | None
) -> tuple[RolloutBatch, dict[str, float]]:
    """Generate and score; with dynamic sampling, replace groups whose rewards are all equal by fresh prompts."""
    g = recipe.grpo.num_generations
    params = sampling_params(recipe.generation, g, seed)
    t0 = time.perf_counter()
    groups = backend.generate(prompts.prompt_ids, params)
    t_gen = time.perf_counter() - t0
    expanded = prompts.select([i for i in range(len(prompts)) for _ in range(g)])
    completions = [c for group in groups for c in group]
    rewards, per_function, failures = score(runner, expanded, completions)
    t_reward = time.perf_counter() - t0 - t_gen
    keep, frac_zero = zero_variance_groups(rewards, g)
    stats = {
        "frac_zero_variance_groups": float(frac_zero),
        "time/generation_s": t_gen,
        "time/rewards_s": t_reward,
    }
    if recipe.grpo.dynamic_sampling and refill is not None:
        rounds = 0
        cursor = 0
        while not bool(keep.all()) and rounds < recipe.grpo.max_refill_rounds and cursor < len(refill):
            rounds += 1
            missing = int((~keep).sum())
            extra = refill.select(list(range(cursor, min(cursor + missing, len(refill)))))
            cursor += len(extra)
            more = backend.generate(
                extra.prompt_ids, sampling_params(recipe.generation, g, seed + 7919 * rounds)
            )
            extra_rows = extra.select([i for i in range(len(extra)) for _ in range(g)])
            extra_completions = [c for group in more for c in group]
            extra_rewards, extra_per_function, extra_failures = score(runner, extra_rows, extra_completions)
            extra_keep, _ = zero_variance_groups(extra_rewards, g)
            slots = [int(i) for i in torch.nonzero(~keep).flatten()]
            informative = [k for k in range(len(extra)) if bool(extra_keep[k])]
            for slot, k in zip(slots, informative, strict=False):  # fill the first free slots in order
                rows = list(range(slot * g, (slot + 1) * g))
                new_rows = list(range(k * g, (k + 1) * g))
                for r, nr in zip(rows, new_rows, strict=True):
                    completions[r] = extra_completions[nr]
                    rewards[r] = extra_rewards[nr]
                    for name in per_function:
                        per_function[name][r] = extra_per_function[name][nr]
                    for key in expanded.columns:
                        expanded.columns[key][r] = extra_rows.columns[key][nr]
                    expanded.messages[r] = extra_rows.messages[nr]
                    expanded.prompt_ids[r] = extra_rows.prompt_ids[nr]
                keep[slot] = True
            failures += extra_failures
        stats["dynamic_sampling/refill_rounds"] = rounds
        stats["dynamic_sampling/kept_groups_frac"] = float(keep.float().mean())
    return RolloutBatch(expanded, completions, rewards, per_function, failures), stats


def padded_sequences(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded [N, L] sequences (prompt ‖ completion), the prompts' lengths and the [N, T_max] completion
    mask: the layout of every per-token tensor of a step, whichever way its rows are fed to the model."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), max(1, max(len(c) for c in completion_ids)), dtype=torch.bool)
    for i, (row, completion) in enumerate(zip(rows, completion_ids, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(completion)] = True
    return {
        "input_ids": ids,
        "prompt_lens": torch.tensor([len(p) for p in prompt_ids]),
        "completion_mask": mask,
    }


def completion_tensors(batch: RolloutBatch, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`padded_sequences` of the rollouts, with the sampler's log-probs and which completions hit max_tokens."""
    completion_ids = [c.token_ids for c in batch.completions]
    tensors = padded_sequences(batch.prompts.prompt_ids, completion_ids, pad_id)
    sampler = torch.zeros(tensors["completion_mask"].shape)
    for i, completion in enumerate(batch.completions):
        n = len(completion.token_ids)
        sampler[i, :n] = torch.tensor(completion.logprobs[:n], dtype=torch.float32)
    tensors["sampler_logps"] = sampler
    tensors["is_truncated"] = torch.tensor([c.finish_reason == "length" for c in batch.completions])
    return {k: v.to(device) for k, v in tensors.items()}


@dataclass
class MicroBatch:
    """One forward (and backward) of the trainer: some of the step's sequences, and where their completion
    tokens are predicted.

    sequences [b]: which rows of the step's [N, ...] tensors it scores, ascending.
    input_ids, position_ids [R, S]: the model's input; R = b right-padded rows, or one packed row whose position
        ids restart at 0 at every sequence (so each sequence attends to itself only), or rows of groups that
        hold their prompt once (`shared_prompt_micro_batches`).
    predictors [n]: flat positions in the R × S input whose output predicts a completion token, in the order of
        completion_mask[sequences].nonzero() (sequence by sequence, token by token).
    attention_mask [R, 1, S, S]: who attends to whom (True = may), when position ids cannot say it; else None.
    """

    sequences: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    predictors: torch.Tensor
    attention_mask: torch.Tensor | None = None


def _predictors(
    tensors: dict[str, torch.Tensor], sequences: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """Position p predicts token p + 1: completion token t of a sequence starting at `start` sits at
    start + prompt_len + t, so it is predicted at start + prompt_len + t − 1."""
    k, t = tensors["completion_mask"][sequences].nonzero(as_tuple=True)
    return starts[k] + tensors["prompt_lens"][sequences][k] - 1 + t


def padded_micro_batch(tensors: dict[str, torch.Tensor], rows: slice) -> MicroBatch:
    """Sequences rows.start.. rows.stop as right-padded rows of the step's width."""
    ids = tensors["input_ids"][rows]
    sequences = torch.arange(len(tensors["input_ids"]), device=ids.device)[rows]
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    starts = torch.arange(len(ids), device=ids.device) * ids.shape[1]
    return MicroBatch(sequences, ids, positions, _predictors(tensors, sequences, starts))


def packed_micro_batches(tensors: dict[str, torch.Tensor], pack_tokens: int) -> list[MicroBatch]:
    """The step's sequences binned into rows of at most `pack_tokens` tokens (exact best-fit-decreasing,
    posttrain.data.packing), without padding: one row per micro-batch."""
    ids = tensors["input_ids"]
    lengths = (tensors["prompt_lens"] + tensors["completion_mask"].sum(1)).cpu()
    longest = int(lengths.argmax())
    if lengths[longest] > pack_tokens:
        raise ValueError(
            f"grpo.pack_tokens={pack_tokens} is shorter than sequence {longest} (prompt + completion: "
            f"{int(lengths[longest])} tokens); raise it to at least data.max_prompt_tokens + generation.max_tokens"
        )
    plan = plan_packs(lengths.numpy(), pack_tokens)
    batches = []
    for b in range(plan.n_bins):
        sequences = torch.from_numpy(np.sort(plan.bin(b)))
        sizes = lengths[sequences]
        starts = torch.cumsum(sizes, 0) - sizes
        # the sequences' tokens, read from their padded rows by one gather
        flat = torch.cat([i * ids.shape[1] + torch.arange(n) for i, n in zip(sequences, sizes, strict=True)])
        positions = torch.cat([torch.arange(n) for n in sizes])
        sequences, starts = sequences.to(ids.device), starts.to(ids.device)
        batches.append(
            MicroBatch(
                sequences,
                ids.flatten()[flat.to(ids.device)][None],
                positions.to(ids.device)[None],
                _predictors(tensors, sequences, starts),
            )
        )
    return batches


def shared_prompt_mask(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """[R, S] segment and branch ids -> [R, 1, S, S] boolean attention mask (True = may attend):

        allowed(i, j) = j ≤ i  ∧  segment_j = segment_i  ∧  (branch_j = 0  ∨  branch_j = branch_i)

    A segment is one prompt (branch 0) followed by its completions (branches 1..G): each completion token sees
    the prompt and the earlier tokens of its own completion — exactly what it saw as prompt ‖ completion alone.
    Every token sees itself, so no row of the mask is empty (padding included)."""
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()
    same_segment = segment[:, :, None] == segment[:, None, :]
    visible_branch = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    allowed = causal & same_segment & visible_branch
    return (allowed | torch.eye(length, dtype=torch.bool, device=segment.device))[:, None]


def _shared_prompt_rows(
    tensors: dict[str, torch.Tensor], groups: torch.Tensor, rows: list[list[int]]
) -> MicroBatch:
    """One micro-batch whose row r holds the segments of groups rows[r], right-padded to the longest row."""
    ids = tensors["input_ids"].cpu()
    width_in = ids.shape[1]
    prompt_lens, completion_lens = tensors["prompt_lens"].cpu(), tensors["completion_mask"].sum(1).cpu()
    built, sequences = [], []
    for row in rows:
        source, positions, segment, branch, predictors, at = [], [], [], [], [], 0
        for g in row:
            members = groups[g]
            prompt = int(prompt_lens[members[0]])
            source.append(members[0] * width_in + torch.arange(prompt))
            positions.append(torch.arange(prompt))
            segment.append(torch.full((prompt,), g))
            branch.append(torch.zeros(prompt, dtype=torch.long))
            last_prompt_token, at = at + prompt - 1, at + prompt
            for k, member in enumerate(members.tolist(), start=1):
                n = int(completion_lens[member])
                source.append(member * width_in + prompt + torch.arange(n))
                positions.append(prompt + torch.arange(n))  # where it sat after its prompt alone
                segment.append(torch.full((n,), g))
                branch.append(torch.full((n,), k))
                # token 0 is predicted by the prompt's last token, token t by the completion's token t - 1
                predictors.append(torch.cat([torch.tensor([last_prompt_token]), at + torch.arange(n - 1)]))
                sequences.append(member)
                at += n
        built.append([torch.cat(x) for x in (source, positions, segment, branch, predictors)])
    width = max(len(b[0]) for b in built)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    segment_ids = torch.full((len(rows), width), -1)  # padding: a segment of its own
    branch_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (source, positions, segment, branch, _) in enumerate(built):
        n = len(source)
        input_ids[r, :n], position_ids[r, :n] = ids.flatten()[source], positions
        segment_ids[r, :n], branch_ids[r, :n] = segment, branch
    predictors = torch.cat([r * width + b[4] for r, b in enumerate(built)])
    device = tensors["input_ids"].device
    return MicroBatch(
        torch.tensor(sequences, device=device),
        input_ids.to(device),
        position_ids.to(device),
        predictors.to(device),
        shared_prompt_mask(segment_ids, branch_ids).to(device),
    )


def shared_prompt_micro_batches(
    tensors: dict[str, torch.Tensor], group_size: int, micro_batch_size: int, pack_tokens: int | None
) -> list[MicroBatch]:
    """Each group of `group_size` consecutive sequences (one prompt, its G completions) scored as one segment
    prompt ‖ completion_1 ‖ … ‖ completion_G, so the prompt goes through the model once instead of G times.
    Completion k keeps the positions it had after its prompt and attends to the prompt and itself only
    (`shared_prompt_mask`), so every log-prob is the one of prompt ‖ completion_k scored alone. Segments go
    into rows of at most `pack_tokens` tokens (best-fit-decreasing, one row per micro-batch) or, with None,
    one segment per padded row, micro_batch_size // group_size of them per micro-batch."""
    ids, prompt_lens = tensors["input_ids"].cpu(), tensors["prompt_lens"].cpu()
    if len(ids) % group_size:
        raise ValueError(f"{len(ids)} sequences do not split into groups of {group_size}")
    groups = torch.arange(len(ids)).view(-1, group_size)
    for members in groups:
        prompt = int(prompt_lens[members[0]])
        if (prompt_lens[members] != prompt).any() or (
            ids[members, :prompt] != ids[members[0], :prompt]
        ).any():
            raise ValueError(
                f"sequences {int(members[0])}..{int(members[-1])} do not share one prompt; grpo.share_prompt "
                f"needs each prompt's {group_size} completions side by side"
            )
    completion_lens = tensors["completion_mask"].sum(1).cpu()
    segment_lens = prompt_lens[groups[:, 0]] + completion_lens[groups].sum(1)
    if pack_tokens is None:
        per_batch = max(1, micro_batch_size // group_size)
        layouts = [
            [[g] for g in range(start, min(start + per_batch, len(groups)))]
            for start in range(0, len(groups), per_batch)
        ]
    else:
        longest = int(segment_lens.argmax())
        if segment_lens[longest] > pack_tokens:
            raise ValueError(
                f"grpo.pack_tokens={pack_tokens} is shorter than group {longest} with its prompt shared "
                f"({int(segment_lens[longest])} tokens); raise it to at least "
                "data.max_prompt_tokens + grpo.num_generations × generation.max_tokens"
            )
        plan = plan_packs(segment_lens.numpy(), pack_tokens)
        layouts = [[sorted(int(g) for g in plan.bin(b))] for b in range(plan.n_bins)]
    return [_shared_prompt_rows(tensors, groups, rows) for rows in layouts]


def micro_batches(
    tensors: dict[str, torch.Tensor],
    micro_batch_size: int,
    pack_tokens: int | None,
    share_prompt_groups: int | None = None,
) -> list[MicroBatch]:
    """The step's forwards: packed rows of up to `pack_tokens` tokens, or (None) `micro_batch_size` padded rows;
    with `share_prompt_groups` = G, each prompt once for its G completions (`shared_prompt_micro_batches`)."""
    if share_prompt_groups is not None:
        return shared_prompt_micro_batches(tensors, share_prompt_groups, micro_batch_size, pack_tokens)
    if pack_tokens is not None:
        return packed_micro_batches(tensors, pack_tokens)
    n = len(tensors["input_ids"])
    return [
        padded_micro_batch(tensors, slice(s, s + micro_batch_size)) for s in range(0, n, micro_batch_size)
    ]


def completion_logprobs(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    micro: MicroBatch | slice,
    temperature: float,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(z_t / T)[y_t] of every completion token of the micro-batch's sequences, [b, T_max], and the
    per-token entropy (zero past each completion's end). A slice of sequences is scored as padded rows.

    The same definition as every generation backend (posttrain.generation.base), so the trainer's π_old and the
    sampler's log-probs are directly comparable. Only the positions that predict a completion token go through
    the output head; with `chunk_size` the head and the log-softmax run per chunk of them
    (posttrain.fast.chunked_loss): no [tokens, vocab] logits are kept.
    """
    if isinstance(micro, slice):
        micro = padded_micro_batch(tensors, micro)
    ids, width = micro.input_ids, micro.input_ids.shape[1]
    mask = tensors["completion_mask"][micro.sequences]
    k, t = mask.nonzero(as_tuple=True)
    sequence = micro.sequences[k]
    targets = tensors["input_ids"][sequence, tensors["prompt_lens"][sequence] + t]
    if chunk_size:
        out = model(ids, micro.position_ids, hidden_only=True, attention_mask=micro.attention_mask)
        hidden = out.hidden.flatten(0, 1)[micro.predictors]
        logps, entropy = chunked_token_logprobs(hidden, out.head_weight, targets, temperature, chunk_size)
    else:
        first = int((micro.predictors % width).min()) if len(micro.predictors) else 0
        # positions first.. of every row
        logits = model(ids, micro.position_ids, logits_from=first, attention_mask=micro.attention_mask).logits
        picked = logits[micro.predictors // width, micro.predictors % width - first].float() / temperature
        log_probs = F.log_softmax(picked, dim=-1)
        logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return _scatter(mask, logps), _scatter(mask, entropy)


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values [mask.sum()] placed where mask is True (row-major), zero elsewhere; differentiable."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


@torch.no_grad()
def frozen_logprobs(
    model: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    batches: list[MicroBatch],
    temperature: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """[N, T_max] completion log-probs of a model that is not trained in this pass (π_old, the reference)."""
    logps = torch.zeros(tensors["completion_mask"].shape, device=tensors["completion_mask"].device)
    for micro in batches:
        logps[micro.sequences] = completion_logprobs(model, tensors, micro, temperature, chunk_size)[0]
    return logps


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


def evaluate(backend: Backend, runner: Any, prompts: PromptSet, recipe: GRPORecipe) -> dict[str, float]:
    """Held-out accuracy: greedy, or pass@1 averaged over `eval.samples` samples at `eval.temperature`."""
    cfg = recipe.eval
    greedy = cfg.temperature == 0
    params = sampling_params(recipe.generation, 1 if greedy else cfg.samples, seed=0, greedy=greedy)
    if not greedy:
        params.temperature = cfg.temperature
    groups = backend.generate(prompts.prompt_ids, params)
    rows = prompts.select([i for i, group in enumerate(groups) for _ in group])
    rewards, per_function, _ = score(runner, rows, [c for group in groups for c in group])
    result = {"eval/reward": float(np.nanmean(rewards.numpy())) if len(rewards) else float("nan")}
    values = per_function.get(cfg.accuracy_reward)
    if values is not None:
        result["eval/accuracy"] = float(np.mean([1.0 if (v or 0) > 0.5 else 0.0 for v in values]))
    return result


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
        completions = grpo.num_generations if grpo.share_prompt else 1
        longest = (
            max((len(ids) for ids in prompts.prompt_ids), default=0)
            + completions * recipe.generation.max_tokens
        )
        if longest > grpo.pack_tokens:
            held = f"{completions} × " if grpo.share_prompt else ""
            raise ValueError(
                f"grpo.pack_tokens={grpo.pack_tokens} cannot hold the longest prompt of {data.train} plus "
                f"{held}generation.max_tokens={recipe.generation.max_tokens} ({longest} tokens); raise it to "
                f"{longest}"
            )
    world, rank = accelerator.num_processes, accelerator.process_index
    if grpo.prompts_per_step % world:
        raise ValueError(
            f"grpo.prompts_per_step ({grpo.prompts_per_step}) must divide over {world} processes"
        )
    local_prompts = grpo.prompts_per_step // world
    loss_cfg = GRPOLossConfig(**{"max_completion_length": recipe.generation.max_tokens, **grpo.loss})
    total_steps = recipe.train.max_steps or max(
        1, math.ceil(recipe.train.epochs * len(prompts) / grpo.prompts_per_step)
    )
    temperature = recipe.generation.temperature or 1.0
    chunk = recipe.train.loss_chunk_size

    if recipe.train.compile_blocks and recipe.generation.backend in ("auto", "hf", "latent"):
        raise ValueError(
            "train.compile_blocks with generation.backend "
            f"{recipe.generation.backend!r}: that backend decodes with the trainer's own (then compiled) module, "
            "one recompilation per new shape; use generation.backend=vllm or leave train.compile_blocks off"
        )
    policy = build_policy(recipe.model)
    if grpo.share_prompt and not policy.takes_dense_mask:
        raise ValueError(
            "grpo.share_prompt needs attention that takes a dense mask: set model.attn_implementation=sdpa "
            f"(the model attends with {policy.attention_implementation!r}) or leave grpo.share_prompt off"
        )
    reference = _make_reference(policy, loss_cfg.beta)
    apply_memory_and_speed_switches(policy, recipe.train)
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
    backend = make_backend(recipe.generation, unwrapped, tokenizer, out)
    eval_backend = backend
    if (perturbation := recipe.generation.sampler_perturbation) is not None:
        backend = PerturbedSampler(
            eval_backend,
            _hf_module(unwrapped),
            lambda noisy: make_backend(recipe.generation, unwrapped, tokenizer, out / "perturbed", noisy),
            perturbation.temperature_factor,
            perturbation.weight_noise,
            perturbation.logit_bias_std,
            perturbation.seed,
        )
    if start_step:
        backend.sync_weights(_hf_module(unwrapped))
    runner = make_reward_runner(recipe.rewards)
    progress = Progress(accelerator, out, recipe.logging, total_steps, start_step)

    if eval_prompts is not None and start_step == 0 and accelerator.is_main_process:
        progress.metrics.write(0, evaluate(eval_backend, runner, eval_prompts, recipe))

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
            if recipe.train.max_grad_norm is not None:
                sums["grad_norm"] = float(
                    accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums.update(update_expert_bias(unwrapped, recipe.model.expert_bias_update))
            pass_metrics.append(sums)
        t_sync = time.perf_counter()
        backend.sync_weights(_hf_module(unwrapped))
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
            values.update(evaluate(eval_backend, runner, eval_prompts, recipe))
        progress.step(
            done,
            values,
            {"reward": f"{values['reward/mean']:.3f}", "len": f"{values['completion_length/mean']:.0f}"},
        )
        if checkpointer.due(done, total_steps):
            checkpointer.save(done, {"reference_refreshed_at": reference_refreshed_at})

    if eval_prompts is not None and accelerator.is_main_process:
        final = evaluate(eval_backend, runner, eval_prompts, recipe)
        progress.metrics.write(total_steps, final)
        log.info("held-out after GRPO: %s", final)
    progress.close()
    runner.close()
    backend.close()
    if eval_backend is not backend:
        eval_backend.close()
    model_dir = out / "model"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        write_report(out, GRPO_REPORT_PANELS, title=f"GRPO — {recipe.output_dir}")
    accelerator.wait_for_everyone()
    return model_dir


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
