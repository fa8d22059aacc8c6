"""The pieces the chunked and the fused loss share (posttrain.fast.head_grads): row chunks that cover every row
once, the head's gradients accumulated chunk by chunk equal to the whole-batch GEMMs in float64, and the backward
of a sum with precomputed gradients scaling them by the upstream scalar."""

import pytest
import torch

from posttrain.fast.head_grads import (
    SumWithPrecomputedGrads,
    add_head_grads_of_chunk,
    head_grad_buffers,
    row_chunks,
)


def test_row_chunks_cover_every_row_once_and_reject_bad_sizes():
    chunks = row_chunks(10, 4)
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert row_chunks(0, 4) == []
    with pytest.raises(ValueError, match="chunk_size"):
        row_chunks(10, 0)


def test_head_grads_accumulated_over_chunks_equal_the_whole_gemms():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(13, 8, generator=g), torch.randn(21, 8, generator=g)
    grad_logits = torch.randn(13, 21, generator=g)
    grad_hidden, grad_weight = head_grad_buffers(hidden, weight, True, True)
    assert grad_weight.dtype == torch.float32 and not grad_weight.any()
    for rows in row_chunks(13, 5):
        add_head_grads_of_chunk(grad_logits[rows], hidden, weight, rows, grad_hidden, grad_weight)
    h64, w64, z64 = hidden.double(), weight.double(), grad_logits.double()
    torch.testing.assert_close(grad_hidden.double(), z64 @ w64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight.double(), z64.T @ h64, rtol=1e-5, atol=1e-5)
    assert head_grad_buffers(hidden, weight, False, False) == (None, None)


class _SumOfSquares(SumWithPrecomputedGrads):
    """Σ (h Wᵀ)² with its gradients computed in forward, as the loss sums do."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):  # noqa: ANN001, ANN205
        ctx.weight_dtype = weight.dtype
        grad_hidden, grad_weight = head_grad_buffers(hidden, weight, True, True)
        total = hidden.new_zeros(())
        for rows in row_chunks(hidden.shape[0], chunk_size):
            logits = hidden[rows] @ weight.T
            total += (logits**2).sum()
            add_head_grads_of_chunk(2 * logits, hidden, weight, rows, grad_hidden, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total


def test_backward_scales_the_precomputed_gradients_by_the_upstream_scalar():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    (0.3 * _SumOfSquares.apply(hidden, weight, None, 4)).backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (0.3 * ((ref_h @ ref_w.T) ** 2).sum()).backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad, rtol=1e-5, atol=1e-5)  # accumulated in float32
