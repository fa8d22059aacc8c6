"""Cross-entropy and per-token log-probs through the output head, without the logits of the whole pack.

With hidden states h [N, d] (the final norm's output) and the output head W [V, d], the plain path builds
z = h Wᵀ [N, V] in full: at N = 8192 tokens and V = 128k that is 4 GiB in float32, and the softmax, its
gradient and the bf16 copy each cost as much again. Here rows are taken `chunk_size` at a time, so only a
[chunk_size, V] block of logits exists at once; every reduction is done in float32.

Cross-entropy sum (SFT):   L = Σ_{i: y_i ≠ −100} ( logsumexp_v z_{i,v} − z_{i,y_i} )
                           ∂L/∂z_i = softmax(z_i) − onehot(y_i)            (0 on rows without a target)
    The upstream gradient of a sum is one scalar, so ∂L/∂h = (∂L/∂z) W and ∂L/∂W = (∂L/∂z)ᵀ h are computed in
    the same pass as the loss and scaled in backward: one logits GEMM per chunk instead of two.

Per-token log-probs (GRPO):  log p_i = z_{i,y_i}/T − logsumexp_v (z_{i,v}/T)
                             H_i = −Σ_v p_{i,v} log p_{i,v}
                             ∂log p_i/∂z_i = (onehot(y_i) − p_i) / T,   ∂H_i/∂z_i = −p_i ⊙ (log p_i + H_i) / T
    The upstream gradient is per token, so backward recomputes each chunk's logits.

Under autocast the GEMMs run in the autocast dtype (as the plain `lm_head` would); the master weight keeps its
gradient in its own dtype through the cast.

`impl`: "chunked" is the code below (any device); "fused" does the same math with one Triton kernel per chunk in
place of the float32 element-wise passes (posttrain.fast.fused_loss; CUDA, or CPU under TRITON_INTERPRET=1);
"auto" (the default) takes "fused" on CUDA when Triton is installed, else "chunked"; "liger" (cross-entropy only)
is Liger's fused linear cross-entropy.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from posttrain.algorithms.sft import IGNORE_INDEX
from posttrain.fast.head_grads import (
    SumWithPrecomputedGrads,
    add_head_grads_of_chunk,
    head_grad_buffers,
    row_chunks,
)

LossImpl = Literal["auto", "chunked", "fused", "liger"]


def _resolve(impl: LossImpl, hidden: torch.Tensor) -> LossImpl:
    if impl not in ("auto", "chunked", "fused", "liger"):
        raise ValueError(f"loss impl must be 'auto', 'chunked', 'fused' or 'liger', got {impl!r}")
    if impl == "fused" and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "loss impl 'fused' runs Triton kernels: it needs CUDA (or TRITON_INTERPRET=1 on CPU)"
        )
    if impl != "auto":
        return impl
    if not hidden.is_cuda:
        return "chunked"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "chunked"
    return "fused"


def _check_shapes(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, d] and lm_head_weight [V, d]; got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The operands the plain `lm_head` would multiply: autocast's dtype when autocast is on."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return hidden.to(dtype), weight.to(dtype)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but lm_head_weight is {weight.dtype}")
    return hidden, weight


def _logits(
    hidden: torch.Tensor, weight: torch.Tensor, rows: slice, temperature: float = 1.0
) -> torch.Tensor:
    logits = (hidden[rows] @ weight.T).float()
    return logits / temperature if temperature != 1.0 else logits


class _LinearCrossEntropySum(SumWithPrecomputedGrads):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):  # noqa: ANN001, ANN205 (autograd signature)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden, grad_weight = head_grad_buffers(hidden, weight, want_hidden, want_weight)
        for rows in row_chunks(hidden.shape[0], chunk_size):
            logits = _logits(hidden, weight, rows)
            has_target = targets[rows] != IGNORE_INDEX
            safe = torch.where(has_target, targets[rows], 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(has_target, lse - picked, 0.0).sum()
            if not (want_hidden or want_weight):
                continue
            # softmax − onehot, written over the logits block to keep one [chunk, V] buffer alive.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(safe), device=safe.device), safe] -= 1.0
            grad_logits.mul_(has_target[:, None])
            add_head_grads_of_chunk(
                grad_logits.to(hidden.dtype), hidden, weight, rows, grad_hidden, grad_weight
            )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):  # noqa: ANN001, ANN205
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logps)
        for rows in row_chunks(hidden.shape[0], chunk_size):
            log_probs = torch.log_softmax(_logits(hidden, weight, rows, temperature), dim=-1)
            logps[rows] = log_probs.gather(1, targets[rows, None]).squeeze(1)
            entropy[rows] = -(log_probs.exp() * log_probs).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):  # noqa: ANN001, ANN205
        hidden, weight, targets, entropy = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden, grad_weight = head_grad_buffers(hidden, weight, want_hidden, want_weight)
        with torch.autocast(hidden.device.type, enabled=False):
            for rows in row_chunks(hidden.shape[0], ctx.chunk_size):
                log_probs = torch.log_softmax(_logits(hidden, weight, rows, ctx.temperature), dim=-1)
                probs = log_probs.exp()
                grad_z = torch.zeros_like(probs)
                if grad_logps is not None:
                    grad_z -= grad_logps[rows, None] * probs
                    grad_z.scatter_add_(1, targets[rows, None], grad_logps[rows, None].float())
                if grad_entropy is not None:
                    grad_z -= grad_entropy[rows, None] * probs * (log_probs + entropy[rows, None])
                grad_z = (grad_z / ctx.temperature).to(hidden.dtype)
                add_head_grads_of_chunk(grad_z, hidden, weight, rows, grad_hidden, grad_weight)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def chunked_token_cross_entropy_sum(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 2048,
    impl: LossImpl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ −log softmax(h_i Wᵀ)[y_i] over rows with a target, and how many there are.

    The same numbers as `posttrain.algorithms.sft.token_cross_entropy_sum(hidden @ W.T, targets)`, values and
    gradients (w.r.t. hidden and W), without the [N, V] logits. hidden [N, d], lm_head_weight [V, d], targets [N]
    with IGNORE_INDEX (−100) where there is no target. `impl`: see the module docstring ("liger" needs the
    package `liger-kernel`).
    """
    _check_shapes(hidden, lm_head_weight, targets)
    count = (targets != IGNORE_INDEX).sum()
    hidden, weight = _compute_dtype(hidden, lm_head_weight)
    if not torch.is_grad_enabled():  # no gradients to prepare in the forward pass
        hidden, weight = hidden.detach(), weight.detach()
    impl = _resolve(impl, hidden)
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(
            hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32
        )
        return total.float(), count
    if impl == "fused":
        from posttrain.fast.fused_loss import FusedLinearCrossEntropySum as function
    else:
        function = _LinearCrossEntropySum
    with torch.autocast(hidden.device.type, enabled=False):
        total = function.apply(hidden, weight, targets, chunk_size)
    return total, count


def chunked_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    impl: LossImpl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h_i Wᵀ / T)[y_i] and the entropy of softmax(h_i Wᵀ / T), both [N] float32.

    The definition of `posttrain.trainers.grpo.completion_logprobs`, without the [N, V] logits: hidden [N, d]
    (only the positions whose next token is scored), lm_head_weight [V, d], targets [N] token ids.
    Differentiable in both outputs w.r.t. hidden and W. `impl`: "auto", "chunked" or "fused" (module docstring).
    """
    _check_shapes(hidden, lm_head_weight, targets)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel():
        low, high = torch.stack(torch.aminmax(targets)).tolist()  # one GPU→host sync, not two
        if low < 0 or high >= lm_head_weight.shape[0]:
            raise ValueError(
                f"targets must be token ids in [0, {lm_head_weight.shape[0]}), got [{low}, {high}]"
            )
    impl = _resolve(impl, hidden)
    if impl == "liger":
        raise ValueError("loss impl 'liger' computes cross-entropy only; use 'auto', 'chunked' or 'fused'")
    hidden, weight = _compute_dtype(hidden, lm_head_weight)
    if impl == "fused":
        from posttrain.fast.fused_loss import FusedLinearLogprobs as function
    else:
        function = _LinearTokenLogprobs
    with torch.autocast(hidden.device.type, enabled=False):
        return function.apply(hidden, weight, targets, temperature, chunk_size)
