"""The head GEMM and the loss in one pass per chunk of tokens: `chunked_loss.py`'s math with its element-wise
float32 passes replaced by one Triton kernel (posttrain.fast.loss_kernels).

Per chunk of rows, z = h Wᵀ comes out of the GEMM in the compute dtype (bf16 under autocast) and the kernel
turns it in place into the loss and ∂L/∂z, so the only [chunk, V] tensor is the GEMM's own output:

Cross-entropy sum (SFT):   forward  z = h Wᵀ → kernel: CE_i and z ← softmax(z_i) − onehot(y_i)
                                    ∂L/∂h = z W,  ∂L/∂W += zᵀ h   (the same pass: the upstream gradient of a
                                    sum is one scalar, applied in backward)
Log-probs and entropy (GRPO): forward  z = h Wᵀ → kernel: log p_i, H_i, lse_i (no gradient yet: it needs the
                                    per-token upstream gradients)
                              backward z = h Wᵀ again → kernel: z ← ∂/∂z → ∂L/∂h = z W, ∂L/∂W += zᵀ h

The equations are those of `chunked_loss.py`'s docstring; the tests check both against each other and against
float64.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.sft import IGNORE_INDEX
from posttrain.fast.head_grads import (
    SumWithPrecomputedGrads,
    add_head_grads_of_chunk,
    head_grad_buffers,
    row_chunks,
)
from posttrain.fast.loss_kernels import cross_entropy_rows_, logprob_entropy_grad_rows_, logprob_entropy_rows


class FusedLinearCrossEntropySum(SumWithPrecomputedGrads):
    """Σ_i CE(h_i Wᵀ, y_i) over rows with a target (see the module docstring); call through `apply`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):  # noqa: ANN001, ANN205 (autograd signature)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden, grad_weight = head_grad_buffers(hidden, weight, want_hidden, want_weight)
        for rows in row_chunks(hidden.shape[0], chunk_size):
            logits = hidden[rows] @ weight.T
            losses[rows], _ = cross_entropy_rows_(
                logits, targets[rows], IGNORE_INDEX, want_hidden or want_weight
            )
            add_head_grads_of_chunk(logits, hidden, weight, rows, grad_hidden, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return losses.sum()


class FusedLinearLogprobs(torch.autograd.Function):
    """(log softmax(h_i Wᵀ / T)[y_i], entropy_i), both [N] float32; call through `apply`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):  # noqa: ANN001, ANN205
        n = hidden.shape[0]
        logps, entropy, lse = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
        for rows in row_chunks(n, chunk_size):
            logps[rows], entropy[rows], lse[rows] = logprob_entropy_rows(
                hidden[rows] @ weight.T, targets[rows], temperature
            )
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):  # noqa: ANN001, ANN205
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden, grad_weight = head_grad_buffers(hidden, weight, want_hidden, want_weight)
        grad_logps = torch.zeros_like(lse) if grad_logps is None else grad_logps
        grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
        for rows in row_chunks(hidden.shape[0], ctx.chunk_size):
            logits = hidden[rows] @ weight.T
            logprob_entropy_grad_rows_(
                logits, targets[rows], lse[rows], entropy[rows], grad_logps[rows], grad_entropy[rows],
                ctx.temperature,
            )  # fmt: skip
            add_head_grads_of_chunk(logits, hidden, weight, rows, grad_hidden, grad_weight)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None
