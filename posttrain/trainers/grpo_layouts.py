"""How a GRPO step's sequences go through the model, and the log-probs they give.

A step holds N = prompts × G sequences prompt ‖ completion. `completion_tensors` lays them out as right-padded
[N, ...] tensors, the frame every per-token quantity of the step lives in (log-probs, advantages, masks). The
forwards then read them in one of three layouts, all giving the same log-probs (tests/trainers/test_grpo_packed):

  - padded rows: `micro_batch_size` sequences per forward, each right-padded to the step's width;
  - packed rows (`grpo.pack_tokens`): sequences binned into rows of at most that many tokens, position ids
    restarting at every sequence, no padding;
  - shared prompt (`grpo.share_prompt`): each prompt once, followed by its G completions, with a dense mask that
    lets each completion see the prompt and itself only.

`completion_logprobs` scores a micro-batch of any layout; `frozen_logprobs` scores the whole step without
gradients (π_old, the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.config import GRPORecipe
from posttrain.data.packing import plan_packs
from posttrain.data.prompts import PromptSet
from posttrain.fast.chunked_loss import chunked_token_logprobs
from posttrain.rollouts import RolloutBatch


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


def check_pack_tokens(recipe: GRPORecipe, prompts: PromptSet) -> None:
    """Refuse `grpo.pack_tokens` shorter than the longest prompt plus the completions one row must hold (one, or
    G with `grpo.share_prompt`), naming the value that would do."""
    grpo, max_tokens = recipe.grpo, recipe.generation.max_tokens
    completions = grpo.num_generations if grpo.share_prompt else 1
    longest = max((len(ids) for ids in prompts.prompt_ids), default=0) + completions * max_tokens
    if longest > grpo.pack_tokens:
        held = f"{completions} × " if grpo.share_prompt else ""
        raise ValueError(
            f"grpo.pack_tokens={grpo.pack_tokens} cannot hold the longest prompt of {recipe.data.train} plus "
            f"{held}generation.max_tokens={max_tokens} ({longest} tokens); raise it to {longest}"
        )


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
