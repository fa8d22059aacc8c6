"""Sampler/trainer log-prob gap: measure it, correct for it (issue 10).

GRPO's ratio π_θ/π_old assumes the completion tokens were drawn from π_old, the policy the trainer computes.
They were drawn from the sampler (vLLM, our own decoder), whose kernels and numerics differ, so every token
carries two log-probs of the same policy weights:

    log q_t  = sampler's log-prob of the sampled token y_t   (the distribution the token came from)
    log p_t  = trainer's log-prob of y_t under π_old           (recomputed before the update, no grad)

and the per-token gap is δ_t = log q_t − log p_t. This module turns δ into metrics, a truncated importance
weight and a per-sequence keep mask. All tensors are padded [B, T] with a completion mask (True = real token);
padding may hold any finite number, it never enters a result.
"""

from __future__ import annotations

from typing import Literal

import torch

GapStatistic = Literal["k1", "k3", "mean_abs_gap", "max_abs_gap"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ_{mask} x / max(|mask|, 1), over all positions (dim=None) or along `dim` (e.g. per sequence)."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values))
    if dim is None:
        return total.sum() / mask.sum().clamp(min=1)
    return total.sum(dim) / mask.sum(dim).clamp(min=1)


def _check_pair(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor) -> None:
    if trainer_logps.shape != sampler_logps.shape or trainer_logps.shape != mask.shape:
        raise ValueError(
            f"trainer_logps {tuple(trainer_logps.shape)}, sampler_logps {tuple(sampler_logps.shape)} and "
            f"mask {tuple(mask.shape)} must all be the same [B, T] shape"
        )


def sequence_gap_statistics(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sequence [B] summaries of the gap δ_t = log q_t − log p_t over the sequence's tokens.

        mean_abs_gap_i = mean_t |δ_t|          max_abs_gap_i = max_t |δ_t|
        k1_i = mean_t δ_t                      k3_i = mean_t (e^{−δ_t} − 1 + δ_t)

    k1 and k3 are Schulman's estimators of KL(q ‖ p) from tokens sampled from q (the sampler — which is where
    the tokens came from): E_q[δ] = KL(q‖p), and E_q[p/q − 1 − log(p/q)] = KL(q‖p) too, with k3 ≥ 0 for every
    token and lower variance; k1 can be negative on a single sequence. Both are per-token means (length-
    normalised, as in DeepSeek-V3.2's off-policy masking); seq_kl_k1 / seq_kl_k3 are the sums over tokens,
    which estimate the KL between the two *sequence* distributions (chain rule: it is the sum of the per-step
    conditional KLs). Sequences without tokens get 0.
    """
    _check_pair(trainer_logps, sampler_logps, mask)
    mask = mask.bool()
    gap = torch.where(mask, sampler_logps - trainer_logps, torch.zeros_like(trainer_logps))
    k3 = torch.expm1(-gap) + gap
    counts = mask.sum(-1).clamp(min=1)
    return {
        "mean_abs_gap": gap.abs().sum(-1) / counts,
        "max_abs_gap": gap.abs().amax(-1),
        "k1": gap.sum(-1) / counts,
        "k3": k3.sum(-1) / counts,
        "seq_kl_k1": gap.sum(-1),
        "seq_kl_k3": k3.sum(-1),
    }


def logprob_gap_metrics(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, threshold: float
) -> dict[str, torch.Tensor]:
    """Batch metrics of the gap (detached scalars), for the run report.

    gap/mean_abs        = Σ_tokens |δ| / N_tokens
    gap/max_abs         = max_tokens |δ|
    gap/frac_over_thr   = #{tokens: |δ| > threshold} / N_tokens
    gap/seq_kl_k1, gap/seq_kl_k3 = mean over sequences of Σ_t δ_t and Σ_t (e^{−δ_t} − 1 + δ_t):
                          estimates of KL(q_seq ‖ p_seq) on the sampler's samples (see
                          `sequence_gap_statistics`); k3 is the one to trust on small batches (≥ 0, lower
                          variance), k1 is logged because a k1 far from k3 flags a heavy-tailed gap.
    """
    with torch.no_grad():
        mask = mask.bool()
        per_sequence = sequence_gap_statistics(trainer_logps, sampler_logps, mask)
        abs_gap = torch.where(mask, (sampler_logps - trainer_logps).abs(), torch.zeros_like(trainer_logps))
        return {
            "gap/mean_abs": masked_mean(abs_gap, mask),
            "gap/max_abs": abs_gap.amax(),
            "gap/frac_over_thr": masked_mean((abs_gap > threshold).to(abs_gap.dtype), mask),
            "gap/seq_kl_k1": per_sequence["seq_kl_k1"].mean(),
            "gap/seq_kl_k3": per_sequence["seq_kl_k3"].mean(),
        }


def truncated_importance_weights(
    trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance sampling weight per token (Ionides 2008; Yao et al. 2025 for vLLM rollouts):

        w_t = min( π_old(y_t) / π_sampler(y_t), C ) = min( exp(log p_t − log q_t), C )

    The tokens were drawn from q, the surrogate's expectation is over π_old, so each token's loss is weighted by
    p/q; truncating at C bounds the variance at the price of a small bias. The weight is a constant (detached):
    it rescales the gradient, it is not optimised. Padding gets w = 1. With identical log-probs w = exp(0) = 1
    exactly, so multiplying by it changes nothing bit for bit.
    """
    if cap <= 0:
        raise ValueError(f"tis_cap must be > 0 (got {cap})")
    _check_pair(trainer_logps, sampler_logps, mask)
    with torch.no_grad():
        log_weight = torch.where(mask.bool(), trainer_logps - sampler_logps, torch.zeros_like(trainer_logps))
        return torch.exp(log_weight).clamp(max=cap)


def off_policy_sequence_mask(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
    statistic: GapStatistic = "k1",
    advantages: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep mask [B] (True = keep) dropping sequences the sampler generated too far from the trainer's policy.

        keep_i = [ S_i ≤ threshold ]                       (advantages=None)
        keep_i = [ A_i ≥ 0 ] ∨ [ S_i ≤ threshold ]         (advantages given: DeepSeek-V3.2 Eq. 9 rule, only
                                                            negative-advantage sequences are ever dropped)

    S_i is one of `sequence_gap_statistics`' per-token statistics: "k1" (DeepSeek-V3.2's mean_t log q/p),
    "k3", "mean_abs_gap" or "max_abs_gap". DeepSeek-V3.2 and TRL compare the sampler with the *current* policy
    π_θ; here the comparison is with π_old (the trainer's rollout-time log-probs), so the mask measures exactly
    the sampler/trainer gap of issue 10, is fixed for all μ passes over a batch (and can be counted before the
    first pass, for exact token normalisers), and is a strict no-op when the sampler agrees with the trainer.
    Drift of π_θ away from π_old across μ passes is the clipped ratio's job.
    """
    if threshold < 0:
        raise ValueError(f"off_policy_mask_threshold must be >= 0 (got {threshold})")
    if statistic not in ("k1", "k3", "mean_abs_gap", "max_abs_gap"):
        raise ValueError(
            f"off_policy_mask_statistic must be k1, k3, mean_abs_gap or max_abs_gap (got {statistic!r})"
        )
    with torch.no_grad():
        keep = sequence_gap_statistics(trainer_logps, sampler_logps, mask)[statistic] <= threshold
        if advantages is not None:
            keep = keep | (advantages >= 0)
        return keep
