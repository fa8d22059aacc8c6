"""Supervised losses: next-token cross-entropy and DeepSeek-V3's multi-token prediction (MTP) loss.

Targets are built from packed rows: `position_ids` restart at 0 for every sample, so two positions i < j
belong to the same sample exactly when position_ids[j] == position_ids[i] + (j - i). That single rule keeps every
target inside its own sample, for the main head (shift 1) and for MTP depth k (shift 1 + k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, position_ids: torch.Tensor, shift: int = 1
) -> torch.Tensor:
    """Targets for predicting `shift` tokens ahead, never across a sample boundary.

        target[i] = input_ids[i + s]   if position_ids[i + s] = position_ids[i] + s and loss_mask[i + s]
                  = IGNORE_INDEX       otherwise (and for the last s positions of a row)

    Shift 1 is the ordinary next-token target; MTP module k (report Eq. 21–25) predicts t_{i+1+k}: shift 1 + k.
    """
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    if shift >= input_ids.shape[-1]:
        return targets
    same_sample = position_ids[..., shift:] == position_ids[..., :-shift] + shift
    keep = same_sample & loss_mask[..., shift:].bool()
    targets[..., :-shift] = torch.where(keep, input_ids[..., shift:], IGNORE_INDEX)
    return targets


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of −log p(y_i | x_{<i}) over positions with a target, and how many there are.

    Returning the sum (not the mean) lets the trainer divide by the number of target tokens in the whole
    optimiser step, across micro-batches and ranks: L = Σ_{all i} CE_i / N_targets.
    """
    flat_targets = targets.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (flat_targets != IGNORE_INDEX).sum()


def mtp_combined_loss(
    main_sum: torch.Tensor,
    main_count: torch.Tensor,
    mtp_sums: list[torch.Tensor],
    mtp_counts: list[torch.Tensor],
    weight: float,
) -> torch.Tensor:
    """L = L_main + λ/D · Σ_{k=1..D} L_mtp_k  (DeepSeek-V3 Eq. 25), each L a mean over its own targets.

    Counts are the global numbers of targets of the optimiser step (all micro-batches, all ranks), so summing
    this over micro-batches gives exactly the full-batch loss.
    """
    loss = main_sum / main_count.clamp(min=1)
    if mtp_sums:
        depth = len(mtp_sums)
        mtp = sum(s / c.clamp(min=1) for s, c in zip(mtp_sums, mtp_counts, strict=True))
        loss = loss + weight / depth * mtp
    return loss
