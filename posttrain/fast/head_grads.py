"""What the chunked and the fused loss through the output head share: row chunks, the head's two gradient GEMMs
per chunk, and the backward of a sum whose gradients were computed in the forward pass.

With hidden states h [N, d], head W [V, d] and a chunk's logits gradient G = ∂L/∂z [rows, V]:

    ∂L/∂h[rows] = G W          ∂L/∂W += Gᵀ h[rows]   (accumulated over chunks in float32)

For a sum L = Σ_i ℓ_i the upstream gradient is one scalar g, so both are computed in the forward pass (one logits
GEMM per chunk instead of two) and backward only scales them: ∂(g·L)/∂h = g ∂L/∂h, ∂(g·L)/∂W = g ∂L/∂W.
"""

from __future__ import annotations

import torch


def row_chunks(n: int, size: int) -> list[slice]:
    """Slices of `size` rows covering range(n), the last one shorter."""
    if size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {size}")
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def head_grad_buffers(
    hidden: torch.Tensor, weight: torch.Tensor, want_hidden: bool, want_weight: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """∂L/∂h (hidden's dtype, every row written by a chunk) and ∂L/∂W (float32, zeroed: chunks add into it)."""
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    )
    return grad_hidden, grad_weight


def add_head_grads_of_chunk(
    grad_logits: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: slice,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> None:
    """Write G W into grad_hidden[rows] and add Gᵀ h[rows] into grad_weight (either may be None: not wanted)."""
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
    if grad_weight is not None:
        grad_weight += (grad_logits.T @ hidden[rows]).float()


class SumWithPrecomputedGrads(torch.autograd.Function):
    """Base of the loss sums whose forward computes the gradients w.r.t. (hidden, weight) and saves them with
    `ctx.save_for_backward(grad_hidden, grad_weight)` and `ctx.weight_dtype`; backward scales them by the
    upstream scalar. Subclasses define forward(ctx, hidden, weight, targets, chunk_size)."""

    @staticmethod
    def backward(ctx, grad_total):  # noqa: ANN001, ANN205 (autograd signature)
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
            None,
            None,
        )
