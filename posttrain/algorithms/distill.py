"""Logit distillation losses (issue 7): forward KL, reverse KL, generalized JSD; full or top-k teacher logits.

Per token, with p_T, p_S the teacher's and student's next-token distributions at temperature τ
(p = softmax(z / τ)):

    forward KL  KL(p_T ‖ p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v))     (Hinton et al. 2015; mode covering)
    reverse KL  KL(p_S ‖ p_T) = Σ_v p_S(v) (log p_S(v) − log p_T(v))     (MiniLLM; mode seeking)
    JSD(β)      β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M),  M = β p_T + (1 − β) p_S,  0 < β < 1
                                                                            (GKD, Agarwal et al. 2024, Eq. 1)

The loss is the mean over the tokens of `mask` (True = a completion token to distil). Hinton's τ² gradient
rescaling is left to the caller. The full-vocabulary work runs in token chunks inside one autograd function
that computes each chunk's loss and gradient in float32 at once, so the only [B, T, V] tensor kept for the
backward pass is the gradient, in the logits' own dtype — never a float32 copy of the logits next to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
TopkTail = Literal["bucket", "renormalize"]


def kl_divergence(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) over the last dim, with 0 · log 0 = 0 (p(v) = 0 adds nothing)."""
    p = p_logprobs.exp()
    log_ratio = torch.where(p > 0, p_logprobs - q_logprobs, torch.zeros_like(p))
    return (p * log_ratio).sum(-1)


def generalized_jsd(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float
) -> torch.Tensor:
    """JSD(β)(p_T ‖ p_S) = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M), M = β p_T + (1 − β) p_S (GKD Eq. 1).

    0 ≤ JSD(β) ≤ h(β) = −β log β − (1 − β) log(1 − β) ≤ log 2. As β → 0, JSD(β)/β → KL(p_T ‖ p_S) (forward);
    as β → 1, JSD(β)/(1 − β) → KL(p_S ‖ p_T) (reverse). log M is a logsumexp of the two weighted log-probs,
    exact where either distribution is tiny.
    """
    if not 0 < beta < 1:
        raise ValueError(
            f"JSD beta must be strictly between 0 and 1 (got {beta}); use forward_kl or reverse_kl"
        )
    mixture = torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta))
    return beta * kl_divergence(teacher_logprobs, mixture) + (1 - beta) * kl_divergence(
        student_logprobs, mixture
    )


def token_divergence(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, divergence: Divergence, beta: float = 0.5
) -> torch.Tensor:
    """Per-token divergence over the last dim (log-probs of two distributions on the same outcomes)."""
    if divergence == "forward_kl":
        return kl_divergence(teacher_logprobs, student_logprobs)
    if divergence == "reverse_kl":
        return kl_divergence(student_logprobs, teacher_logprobs)
    if divergence == "jsd":
        return generalized_jsd(student_logprobs, teacher_logprobs, beta)
    raise ValueError(f"divergence must be 'forward_kl', 'reverse_kl' or 'jsd' (got {divergence!r})")


def topk_distributions(
    student_logprobs: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, tail: TopkTail
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs on the same small outcome set, from a teacher cached as its top-k.

    The cache holds, per token, the teacher's k most likely ids K and their log-probs log p_T(v), v ∈ K, taken
    from the full softmax (so Σ_K p_T ≤ 1). student_logprobs is the student's full-vocab log-softmax [n, V].

    tail="bucket" (default): k + 1 outcomes, the k ids and "any other token":
        p_T(other) = 1 − Σ_K p_T(v),   p_S(other) = Σ_{v∉K} p_S(v)
      Both stay true distributions with nothing renormalised; the divergence is that of the coarse-grained
      distributions, a lower bound of the full-vocab one (data processing inequality), equal when the
      teacher's mass is all in K. The student is pushed to keep the teacher's tail mass off-K too.
    tail="renormalize": k outcomes, both distributions conditioned on K:
        p̃(v) = p(v) / Σ_K p   for v ∈ K
      Ignores how much mass the student puts outside K (it is not pushed down); cheaper to reason about, and
      what a teacher cache without a tail reduces to.
    """
    if teacher_ids.shape != teacher_logprobs.shape:
        raise ValueError(
            f"teacher top-k ids {tuple(teacher_ids.shape)} and logprobs {tuple(teacher_logprobs.shape)} differ"
        )
    student_on_k = student_logprobs.gather(-1, teacher_ids)
    if tail == "renormalize":
        return (
            student_on_k - student_on_k.logsumexp(-1, keepdim=True),
            teacher_logprobs - teacher_logprobs.logsumexp(-1, keepdim=True),
        )
    if tail == "bucket":
        student_off_k = student_logprobs.scatter(-1, teacher_ids, -torch.inf).logsumexp(-1, keepdim=True)
        teacher_mass_on_k = teacher_logprobs.logsumexp(-1, keepdim=True).clamp(max=0.0)
        teacher_off_k = torch.log(-torch.expm1(teacher_mass_on_k))
        return torch.cat([student_on_k, student_off_k], -1), torch.cat([teacher_logprobs, teacher_off_k], -1)
    raise ValueError(f"topk_tail must be 'bucket' or 'renormalize' (got {tail!r})")


class _ChunkedTokenLoss(torch.autograd.Function):
    """Σ over the given rows of token_loss(student_logits[row], teacher[row]), loss and gradient in one pass.

    Each chunk is upcast to float32 (float64 stays float64); its loss and d(loss)/d(logits) come from a local
    autograd call, and the gradient goes into one buffer of the logits' dtype; backward only scales that buffer.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        student_logits: torch.Tensor,
        rows: torch.Tensor,
        teacher: tuple[torch.Tensor, ...],
        token_loss: Callable[..., torch.Tensor],
        chunk_size: int,
    ) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(student_logits) if needs_grad else None
        compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
        total = student_logits.new_zeros((), dtype=compute_dtype)
        for start in range(0, rows.numel(), chunk_size):
            chunk_rows = rows[start : start + chunk_size]
            with torch.enable_grad():
                logits = student_logits[chunk_rows].to(compute_dtype).requires_grad_(needs_grad)
                chunk_total = token_loss(logits, *(t[chunk_rows] for t in teacher)).sum()
            if needs_grad:
                (chunk_grad,) = torch.autograd.grad(chunk_total, logits)
                grad[chunk_rows] = chunk_grad.to(grad.dtype)
            total += chunk_total.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_total: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    topk_tail: TopkTail = "bucket",
    chunk_size: int | None = 4096,
    num_tokens_global: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """L = 1/N_tok Σ_{(b,t) ∈ mask} D(p_T(·|b,t) ‖ p_S(·|b,t)), D = forward KL, reverse KL or JSD(β).

    student_logits [B, T, V] (any float dtype; computed in float32 per chunk). The teacher is either full
    logits [B, T, V] (same vocabulary; both divided by `temperature`) or a top-k cache: ids [B, T, k] and
    log-probs [B, T, k] (see `topk_distributions`; the cache must have been taken at the same temperature —
    here τ divides the student's logits only). chunk_size tokens are processed at a time (None: all at once).
    N_tok = `num_tokens_global` (all micro-batches and ranks of the step, so micro-batch losses sum to the
    full-batch loss) or this micro-batch's mask count.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if student_logits.ndim != 3 or mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"student_logits must be [B, T, V] and mask [B, T] (got {tuple(student_logits.shape)}, "
            f"{tuple(mask.shape)})"
        )
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"JSD beta must be strictly between 0 and 1 (got {beta})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None (got {chunk_size})")
    vocab = student_logits.shape[-1]

    if teacher_logits is not None:
        if teacher_topk_ids is not None or teacher_topk_logprobs is not None:
            raise ValueError("give either teacher_logits or the teacher top-k cache, not both")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits "
                f"{tuple(student_logits.shape)} (same tokenizer and vocabulary)"
            )
        teacher = (teacher_logits.detach().reshape(-1, vocab),)

        def token_loss(student: torch.Tensor, teacher_chunk: torch.Tensor) -> torch.Tensor:
            student_logprobs = torch.log_softmax(student / temperature, -1)
            teacher_logprobs = torch.log_softmax(teacher_chunk.to(student.dtype) / temperature, -1)
            return token_divergence(student_logprobs, teacher_logprobs, divergence, beta)

    elif teacher_topk_ids is not None and teacher_topk_logprobs is not None:
        if teacher_topk_ids.shape[:2] != mask.shape:
            raise ValueError(
                f"teacher top-k ids {tuple(teacher_topk_ids.shape)} must be [B, T, k] for mask [B, T]"
            )
        k = teacher_topk_ids.shape[-1]
        if k >= vocab:
            raise ValueError(
                f"a top-k cache with k={k} >= vocabulary {vocab} is the full teacher: pass teacher_logits"
            )
        teacher = (teacher_topk_ids.reshape(-1, k), teacher_topk_logprobs.detach().reshape(-1, k))

        def token_loss(
            student: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor
        ) -> torch.Tensor:
            student_logprobs = torch.log_softmax(student / temperature, -1)
            pair = topk_distributions(student_logprobs, ids, teacher_logprobs.to(student.dtype), topk_tail)
            return token_divergence(*pair, divergence, beta)

    else:
        raise ValueError(
            "distillation_loss needs teacher_logits or both teacher_topk_ids and teacher_topk_logprobs"
        )

    rows = mask.reshape(-1).bool().nonzero().squeeze(-1)
    total = _ChunkedTokenLoss.apply(
        student_logits.reshape(-1, vocab), rows, teacher, token_loss, chunk_size or max(rows.numel(), 1)
    )
    return total / (max(rows.numel(), 1) if num_tokens_global is None else num_tokens_global)
