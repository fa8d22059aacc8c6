"""GRPO and its variants as small pure functions on padded [B, T] tensors, composed by `grpo_loss`.

Notation (DeepSeekMath §4.1, DeepSeek-R1 §2.2.1): a prompt q, G completions o_1..o_G sampled from π_old,
rewards r_i, token t of completion i. Rows of a batch are completions; groups are G consecutive rows.

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t ( min( ρ_{i,t} A_i, clip(ρ_{i,t}, 1−ε_low, 1+ε_high) A_i ) − β D_KL,i,t ) ]
    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t})

Variants, each a switch of `GRPOLossConfig`: clip-higher and token-mean aggregation (DAPO, Yu et al. 2025),
no std scaling and a constant normaliser (Dr. GRPO, Liu et al. 2025), sequence-level ratios (GSPO, Zheng et al.
2025), dual-clip (Ye et al. 2020), truncated importance sampling and off-policy masking for the sampler/trainer
gap (`rollout_fidelity`). Log-probs are of the sampled tokens, [B, T]; masks are True on completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from posttrain.algorithms.rollout_fidelity import (
    GapStatistic,
    logprob_gap_metrics,
    masked_mean,
    off_policy_sequence_mask,
    truncated_importance_weights,
)

RewardScale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "dapo", "token_mean", "dr_grpo"]
ImportanceSamplingLevel = Literal["token", "sequence"]


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [num_groups * group_size] (got shape {tuple(rewards.shape)})")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: RewardScale = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages A_i and the mask of completions that have a reward.

        A_i = (r_i − mean_g(r)) / (std_g(r) + eps)     scale="group"  (DeepSeekMath, R1)
        A_i = (r_i − mean_g(r)) / (std_B(r) + eps)     scale="batch"  (group mean, batch std: Liu et al. 2025,
                                                                      "Tricks or Traps")
        A_i =  r_i − mean_g(r)                          scale="none"   (Dr. GRPO: no std, no difficulty bias)

    `rewards` is [N], groups are `group_size` consecutive entries. std is Bessel-corrected (as TRL's), eps = 1e-4
    as in TRL. A reward of NaN means "no reward" (the reward function failed or returned None): it is excluded
    from mean and std, its advantage is 0, and valid[i] = False so the caller removes it from the loss — it is
    never treated as a reward of 0. A group with fewer than two valid rewards has std 0 and all-zero advantages.
    Returns (advantages [N], valid [N] bool).
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none' (got {scale!r})")
    grouped = _grouped(rewards, group_size)
    valid = ~torch.isnan(grouped)
    zeros = torch.zeros_like(grouped)
    count = valid.sum(-1, keepdim=True)
    mean = torch.where(valid, grouped, zeros).sum(-1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, grouped - mean, zeros)
    if scale == "group":
        std = (centered.square().sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        centered = centered / (std + eps)
    elif scale == "batch":
        valid_rewards = grouped[valid]
        std = valid_rewards.std() if valid_rewards.numel() > 1 else zeros.new_zeros(())
        centered = centered / (std + eps)
    return centered.reshape(-1), valid.reshape(-1)


def zero_variance_groups(
    rewards: torch.Tensor, group_size: int, atol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask per group for dynamic sampling (DAPO §3.2) and the fraction of groups without signal.

        keep_g = [ max_{i∈g} r_i − min_{i∈g} r_i > atol ]     over the group's non-NaN rewards

    A group whose rewards are all equal has A_i = 0 for every member: it costs a forward/backward and moves
    nothing (except through the KL term), so dynamic sampling drops it and refills the batch. A group with
    fewer than two valid rewards has no variance either. Returns (keep [num_groups] bool, fraction dropped).
    """
    grouped = _grouped(rewards, group_size)
    valid = ~torch.isnan(grouped)
    highest = torch.where(valid, grouped, torch.full_like(grouped, -torch.inf)).amax(-1)
    lowest = torch.where(valid, grouped, torch.full_like(grouped, torch.inf)).amin(-1)
    keep = (valid.sum(-1) >= 2) & (highest - lowest > atol)
    return keep, (~keep).float().mean()


def mask_truncated_completions(completion_mask: torch.Tensor, is_truncated: torch.Tensor) -> torch.Tensor:
    """loss_mask_{i,t} = completion_mask_{i,t} ∧ ¬truncated_i   (DAPO §3.4, overlong filtering).

    A completion cut at max_completion_length has no final answer, so its reward says nothing about its
    reasoning; masking it removes it from the loss and from the token count.
    """
    if is_truncated.shape != completion_mask.shape[:1]:
        raise ValueError(
            f"is_truncated must be [B]={tuple(completion_mask.shape[:1])} (got {tuple(is_truncated.shape)})"
        )
    return completion_mask.bool() & ~is_truncated.bool()[:, None]


def log_importance_ratio(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: ImportanceSamplingLevel = "token"
) -> torch.Tensor:
    """log ρ per token, [B, T].

    level="token" (GRPO):     log ρ_{i,t} = log π_θ(o_{i,t}) − log π_old(o_{i,t})
    level="sequence" (GSPO):  log s_i = 1/|o_i| Σ_t (log π_θ(o_{i,t}) − log π_old(o_{i,t}))   (the
                              length-normalised sequence ratio), in the paper's "GSPO-token" form:
                              log s_{i,t} = sg[log s_i] + log π_θ(o_{i,t}) − sg[log π_θ(o_{i,t})]

    s_{i,t} has the value s_i for every token (so clipping it clips the whole sequence), and gradient
    ∇ s_{i,t} = s_i ∇ log π_θ(o_{i,t}). Under every aggregation of this module that gives exactly the GSPO
    gradient s_i A_i ∇ (1/|o_i|) Σ_t log π_θ(o_{i,t}) per sequence, with a uniform [B, T] loss tensor.
    """
    if level == "token":
        return logps - old_logps
    if level == "sequence":
        sequence_log_ratio = masked_mean(logps - old_logps, mask, dim=-1)[:, None]
        return sequence_log_ratio.detach() + (logps - logps.detach())
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence' (got {level!r})")


def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO loss with clip-higher and optional dual-clip, and where each clip is active.

        ℓ_{i,t} = −min( ρ A_i, clip(ρ, 1 − ε_low, 1 + ε_high) A_i )                    (PPO; DAPO clip-higher)
        ℓ_{i,t} = −max( min( ρ A_i, clip(ρ, 1 − ε_low, 1 + ε_high) A_i ), δ A_i )  if A_i < 0 and δ is set
                                                                                  (dual-clip, δ > 1 + ε_high)

    The dual clip bounds the loss of a negative-advantage token whose ratio exploded; it equals TRL's `delta`
    (which caps ρ at δ inside the min). Clip statistics, bool [B, T], are TRL's definitions — a token counts as
    clipped where the clip zeroes its gradient:
        low  = ρ < 1 − ε_low  ∧ A < 0       high = ρ > 1 + ε_high ∧ A > 0       dual = ρ > δ ∧ A < 0
    """
    if delta is not None and delta <= 1 + epsilon_high:
        raise ValueError(f"delta must be > 1 + epsilon_high = {1 + epsilon_high} (got {delta})")
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    stats = {"low": (ratio < 1 - epsilon_low) & (adv < 0), "high": (ratio > 1 + epsilon_high) & (adv > 0)}
    if delta is not None:
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, delta * adv), surrogate)
        stats["dual"] = (ratio > delta) & (adv < 0)
    return -surrogate, stats


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate, Schulman's k3 (as in DeepSeekMath's GRPO):

        D_KL,t = π_ref/π_θ − log(π_ref/π_θ) − 1 = exp(ref − logp) − (ref − logp) − 1   ≥ 0

    unbiased for tokens sampled from π_θ. Computed as expm1(d) − d, exact for small d. β = 0 means no KL term:
    the caller then never runs the reference model.
    """
    log_ref_over_policy = ref_logps - logps
    return torch.expm1(log_ref_over_policy) - log_ref_over_policy


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    num_tokens_global: int | torch.Tensor | None = None,
    num_sequences_global: int | torch.Tensor | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce the per-token loss ℓ [B, T] to this micro-batch's share of the global loss.

        "grpo":                  L = 1/N_seq Σ_i ( Σ_t m_{i,t} ℓ_{i,t} / Σ_t m_{i,t} )     (DeepSeekMath)
        "dapo" / "token_mean":   L = 1/N_tok Σ_{i,t} m_{i,t} ℓ_{i,t}                         (DAPO §3.3)
        "dr_grpo":               L = 1/(N_seq · L_max) Σ_{i,t} m_{i,t} ℓ_{i,t}               (Dr. GRPO)

    N_tok (`num_tokens_global`) is the number of loss tokens and N_seq (`num_sequences_global`) the number of
    completions, in the whole optimiser step: all micro-batches of the accumulation and all ranks. Then summing
    the returned values over micro-batches and ranks gives exactly the full-batch loss. Defaults are this
    micro-batch's own counts (right for a single micro-batch on one rank). Under DDP, which averages gradients
    over ranks, the caller multiplies by the world size. L_max is the constant max_completion_length.
    A sequence with no loss token (masked out) adds 0 to "grpo" but still counts in N_seq, as in TRL.
    """
    mask = mask.bool()
    masked_loss = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    num_sequences = per_token_loss.shape[0] if num_sequences_global is None else num_sequences_global
    if loss_type == "grpo":
        return (masked_loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_sequences
    if loss_type in ("dapo", "token_mean"):
        num_tokens = mask.sum().clamp(min=1) if num_tokens_global is None else num_tokens_global
        return masked_loss.sum() / num_tokens
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant normaliser)")
        return masked_loss.sum() / (num_sequences * max_completion_length)
    raise ValueError(f"loss_type must be 'grpo', 'dapo', 'token_mean' or 'dr_grpo' (got {loss_type!r})")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Switches of the GRPO objective. Names are TRL's (`GRPOConfig`) where TRL has the option.

    Defaults are TRL 1.16's except:
    - tis_cap = 2.0 (TRL: vllm_importance_sampling_mode="sequence_mask", clip_max=3.0). Token-level truncation
      at C = 2 is the correction of Yao et al. 2025 and keeps every token's learning signal; a sequence-level
      mask throws away whole sequences for a gap in one token. It acts only when sampler log-probs are given.
    - off_policy_mask_threshold compares the sampler with π_old, not with π_θ (see `off_policy_sequence_mask`),
      and drops any sequence over it unless off_policy_mask_negative_only (DeepSeek-V3.2's rule) is set.
    - the truncated importance weight multiplies the whole per-token loss, KL included: the KL's tokens come
      from the sampler too (TRL weights only the policy term).
    - max_completion_length is needed only by "dr_grpo" (TRL takes it from the generation settings).
    scale_rewards is read by the caller for `group_advantages`; the loss itself takes advantages.
    """

    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: = epsilon; DAPO's clip-higher uses 0.28
    delta: float | None = None  # dual-clip bound for negative advantages
    beta: float = 0.0  # KL weight; 0 skips the reference model
    use_bias_correction_kl: bool = True  # weight the k3 KL by ρ (DeepSeek-V3.2): unbiased ∇KL(π_θ‖π_ref)
    loss_type: LossType = "dapo"
    max_completion_length: int | None = None
    scale_rewards: RewardScale = "group"
    importance_sampling_level: ImportanceSamplingLevel = "token"
    mask_truncated_completions: bool = False
    tis_cap: float | None = 2.0  # None: no truncated importance sampling
    off_policy_mask_threshold: float | None = None  # None: keep every sequence
    off_policy_mask_statistic: GapStatistic = "k1"
    off_policy_mask_negative_only: bool = False
    gap_threshold: float = 1e-3  # |log q − log p| counted in gap/frac_over_thr (issue 10's 1e-3 nats)

    def __post_init__(self) -> None:
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon must be in [0, 1) (got {self.epsilon})")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0 (got {self.epsilon_high})")
        if self.delta is not None and self.delta <= 1 + self.epsilon_high_value:
            raise ValueError(
                f"delta must be > 1 + epsilon_high = {1 + self.epsilon_high_value} (got {self.delta})"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0 (got {self.beta})")
        if self.loss_type not in ("grpo", "dapo", "token_mean", "dr_grpo"):
            raise ValueError(
                f"loss_type must be 'grpo', 'dapo', 'token_mean' or 'dr_grpo' (got {self.loss_type!r})"
            )
        if self.loss_type == "dr_grpo" and (self.max_completion_length or 0) < 1:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length >= 1")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none' (got {self.scale_rewards!r})")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level must be 'token' or 'sequence' (got {self.importance_sampling_level!r})"
            )
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 or None (got {self.tis_cap})")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ValueError(f"off_policy_mask_threshold must be >= 0 (got {self.off_policy_mask_threshold})")
        if self.off_policy_mask_statistic not in ("k1", "k3", "mean_abs_gap", "max_abs_gap"):
            raise ValueError(
                "off_policy_mask_statistic must be 'k1', 'k3', 'mean_abs_gap' or 'max_abs_gap' "
                f"(got {self.off_policy_mask_statistic!r})"
            )

    @property
    def epsilon_high_value(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def loss_token_mask(
    completion_mask: torch.Tensor,
    config: GRPOLossConfig,
    advantages: torch.Tensor,
    reward_valid: torch.Tensor | None = None,
    is_truncated: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens that enter the loss, bool [B, T]: completion ∧ has a reward ∧ (not truncated) ∧ on-policy,
    and the off-policy keep mask [B] (None when off-policy masking is off or there are no sampler log-probs).

    Everything here is known when the rollout batch is scored, before the first optimisation pass, so the
    trainer calls this once to count `num_tokens_global` for "dapo" exactly; `grpo_loss` calls it again.
    """
    mask = completion_mask.bool()
    if reward_valid is not None:
        mask = mask & reward_valid.bool()[:, None]
    if config.mask_truncated_completions:
        if is_truncated is None:
            raise ValueError("mask_truncated_completions=True needs is_truncated [B]")
        mask = mask_truncated_completions(mask, is_truncated)
    if config.off_policy_mask_threshold is None or sampler_logps is None:
        return mask, None
    if old_logps is None:
        raise ValueError("off-policy masking needs the trainer's old_logps next to sampler_logps")
    keep = off_policy_sequence_mask(
        old_logps,
        sampler_logps,
        mask,
        config.off_policy_mask_threshold,
        config.off_policy_mask_statistic,
        advantages if config.off_policy_mask_negative_only else None,
    )
    return mask & keep[:, None], keep


def grpo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    config: GRPOLossConfig,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    reward_valid: torch.Tensor | None = None,
    is_truncated: torch.Tensor | None = None,
    num_tokens_global: int | torch.Tensor | None = None,
    num_sequences_global: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of one micro-batch and its metrics (detached 0-d tensors, means over this micro-batch).

        ℓ_{i,t} = w_{i,t} · ( −min(ρ A_i, clip(ρ) A_i) [dual-clipped] + β · c_{i,t} · D_KL,i,t )
        L       = aggregate(ℓ, loss mask)

    logps [B, T]: π_θ's log-probs of the sampled tokens (with grad). old_logps: π_old's, from the trainer before
    the first pass; None means μ = 1 on-policy, π_old = sg[π_θ] (ρ = 1 in value, ∇ρ = ∇ log π_θ).
    ref_logps: needed iff beta > 0. sampler_logps: the sampler's log-probs of the same tokens; when given, the
    gap is measured (gap/*), and corrected by w = min(π_old/π_sampler, tis_cap) (w = 1 without it) and by
    off-policy masking. c = ρ when use_bias_correction_kl (DeepSeek-V3.2: E_old[ρ · k3] has gradient
    ∇KL(π_θ‖π_ref)), else 1. advantages [B] come from `group_advantages` (reward_valid is its mask).
    Sampler log-probs must be finite on completion tokens (a backend that cannot score a token must say so
    before this call). Token metrics are means over loss tokens; at importance_sampling_level="sequence" a
    clipped sequence therefore counts with its length in clip_ratio/* (TRL counts it once).
    """
    if logps.ndim != 2 or logps.shape != completion_mask.shape:
        raise ValueError(
            f"logps {tuple(logps.shape)} and completion_mask {tuple(completion_mask.shape)} must be the same [B, T]"
        )
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be [B]={tuple(logps.shape[:1])} (got {tuple(advantages.shape)})")
    if config.beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps (or set beta=0 to skip the reference model)")
    old_logps = logps.detach() if old_logps is None else old_logps
    mask, off_policy_keep = loss_token_mask(
        completion_mask, config, advantages, reward_valid, is_truncated, old_logps, sampler_logps
    )

    log_ratio = log_importance_ratio(logps, old_logps, mask, config.importance_sampling_level)
    per_token_loss, clipped = clipped_surrogate(
        log_ratio, advantages, config.epsilon, config.epsilon_high_value, config.delta
    )
    metrics = {f"clip_ratio/{name}_mean": masked_mean(hit.float(), mask) for name, hit in clipped.items()}
    metrics["clip_ratio/region_mean"] = masked_mean((clipped["low"] | clipped["high"]).float(), mask)
    metrics["ratio/mean"] = masked_mean(torch.exp(log_ratio.detach()), mask)

    if config.beta > 0:
        kl = k3_kl(logps, ref_logps)
        metrics["kl"] = masked_mean(kl.detach(), mask)
        if config.use_bias_correction_kl:
            kl = kl * torch.exp(log_ratio)
        per_token_loss = per_token_loss + config.beta * kl

    if sampler_logps is not None:
        metrics.update(logprob_gap_metrics(old_logps, sampler_logps, completion_mask, config.gap_threshold))
        if config.tis_cap is not None:
            weights = truncated_importance_weights(old_logps, sampler_logps, mask, config.tis_cap)
            per_token_loss = per_token_loss * weights
            metrics["tis/weight_mean"] = masked_mean(weights, mask)
            metrics["tis/capped_frac"] = masked_mean((weights >= config.tis_cap).float(), mask)
        if off_policy_keep is not None:
            metrics["off_policy/masked_frac"] = (~off_policy_keep).float().mean()

    loss = aggregate_loss(
        per_token_loss,
        mask,
        config.loss_type,
        num_tokens_global,
        num_sequences_global,
        config.max_completion_length,
    )
    metrics["loss_tokens"] = mask.sum()
    return loss, {name: value.detach() for name, value in metrics.items()}
