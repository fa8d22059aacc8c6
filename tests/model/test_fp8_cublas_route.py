"""The cuBLAS route of the FP8 GEMM (torch._scaled_mm's block-wise modes) on CPU: our layouts, read with the
semantics ATen documents for those modes (torch/_meta_registrations.py: A [M, K] @ B [K, N], scale_a
[M, K/128], scale_b [K/128, N/128] or [K/128, N]), give the reference product; and the one-time self-check
refuses a stack that rejects the scales or reads them differently. bench/model_fp8.py runs the real kernel."""

import pytest
import torch

import posttrain.model.fp8 as fp8
from posttrain.model.fp8 import FP8_DTYPE, cublas_block_matmul, fp8_block_matmul, quantize_blocks


def aten_block_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """float64 model of torch._scaled_mm with block-wise scales, per the shapes ATen accepts."""
    assert a.dtype == b.dtype == FP8_DTYPE
    (m, k), n = a.shape, b.shape[1]
    kb = -(-k // 128)
    assert scale_a.shape == (m, kb), scale_a.shape
    a_deq = a.double() * scale_a.double().repeat_interleave(128, 1)[:, :k]
    spread_k = scale_b.double().repeat_interleave(128, 0)[:k]
    if scale_b.shape == (kb, -(-n // 128)):
        b_deq = b.double() * spread_k.repeat_interleave(128, 1)[:, :n]
    else:
        assert scale_b.shape == (kb, n), scale_b.shape
        b_deq = b.double() * spread_k
    return (a_deq @ b_deq).to(out_dtype)


def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    return aten_block_scaled_mm(a, b, scale_a, scale_b, out_dtype)


@pytest.mark.parametrize(
    "m,n,k,b_rows",
    [(300, 260, 384, 128), (256, 7 * 128, 2 * 128, 128), (130, 520, 384, 1)],  # fwd/dgrad blocks, wgrad tiles
)
def test_cublas_layouts_read_with_atens_semantics_give_the_reference_product(monkeypatch, m, n, k, b_rows):
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    g = torch.Generator().manual_seed(m + n)
    a = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    b = torch.randn(n, k, generator=g) * torch.rand(1, k, generator=g) * 10
    a_q, a_scale = quantize_blocks(a, (1, 128))
    b_q, b_scale = quantize_blocks(b, (b_rows, 128))
    out = cublas_block_matmul(a_q, a_scale, b_q, b_scale, b_rows, torch.float64)
    reference = fp8_block_matmul(a_q, a_scale, b_q, b_scale, torch.float64)  # CPU: the dequantising path
    assert ((out - reference).norm() / reference.norm()).item() < 1e-6  # float32 vs float64 summation


def test_self_check_trusts_only_a_stack_that_reads_the_scales_right(monkeypatch):
    device = torch.device("cpu")
    cases = {
        "right": fake_scaled_mm,
        "ignores the scales": lambda a, b, scale_a, scale_b, out_dtype: (a.double() @ b.double()).to(
            out_dtype
        ),
        "refuses": lambda *args, **kwargs: (_ for _ in ()).throw(
            RuntimeError("block-wise scaling unsupported")
        ),
    }
    for name, implementation in cases.items():
        monkeypatch.setattr(torch, "_scaled_mm", implementation)
        for b_rows in (128, 1):
            fp8._CUBLAS_BLOCK_SCALING.clear()
            works = fp8._cublas_block_scaling_works(device, b_rows, torch.float32)
            assert works == (name == "right"), (name, b_rows)
    fp8._CUBLAS_BLOCK_SCALING.clear()
