"""The Triton FP8 GEMM kernel's logic on CPU: TRITON_INTERPRET=1 runs it with NumPy. Checked against the
PyTorch reference (which defines its semantics) on shapes that exercise the edges: M, N, K not multiples of
the blocks, B scaled per 128×128 block and per row, several row groups of the launch order. Speed and the
quantisation kernel are checked on a GPU by bench/model_fp8.py (the interpreter's own float8 rounding is
not IEEE-exact, so bit-exact quantisation cannot be checked here)."""

import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import itertools

    import torch
    from posttrain.model.fp8 import fp8_block_matmul, quantize_blocks
    from posttrain.model.kernels.fp8 import fp8_block_gemm

    # BLOCK_N 32 folds B's block scale into A's row scales; 256 spans two blocks and scales per column.
    # BLOCK_N 32 folds B's block scale into A's row scales; 256 spans two blocks and scales per column.
    configs = [{"BLOCK_M": 64, "BLOCK_N": 32, "GROUP_M": 2}, {"BLOCK_M": 32, "BLOCK_N": 256, "GROUP_M": 1}]
    shapes = [(200, 300, 260, 128), (130, 70, 384, 128), (64, 96, 256, 1), (5, 129, 100, 1)]
    for (m, n, k, b_rows), config in itertools.product(shapes, configs):
        g = torch.Generator().manual_seed(m + n + k)
        a_q, a_scale = quantize_blocks(torch.randn(m, k, generator=g), (1, 128))
        b_q, b_scale = quantize_blocks(torch.randn(n, k, generator=g), (b_rows, 128))
        ref = fp8_block_matmul(a_q, a_scale, b_q, b_scale, torch.float32)
        out = fp8_block_gemm(a_q, a_scale, b_q, b_scale, b_rows, 128, torch.float32, config)
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (m, n, k, b_rows, config, err)
    print("ok")
    """
)


def test_triton_gemm_kernel_matches_reference_in_interpreter(run_in_triton_interpreter):
    run_in_triton_interpreter(SCRIPT)


ROWS_AND_COLUMNS = textwrap.dedent(
    """
    import torch
    from posttrain.model.fp8 import FP8_DTYPE, dequantize_blocks, quantize_blocks
    from posttrain.model.kernels.fp8 import quantize_rows_and_columns

    for m, k in [(200, 300), (256, 384), (5, 129), (130, 128)]:
        g = torch.Generator().manual_seed(m + k)
        x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 8
        x[:, 7] = 0.0  # an all-zero column tile: the floor keeps its scale finite
        q, scale, q_t, scale_t = quantize_rows_and_columns(x.bfloat16().float())
        x = x.bfloat16().float()
        want = {"rows": quantize_blocks(x, (1, 128)), "cols": quantize_blocks(x, (128, 1), transpose=True)}
        got = {"rows": (q, scale), "cols": (q_t, scale_t)}
        # cuBLAS's layouts: scale [M, K/128] stored M-major, scale_t [K, M/128] stored K-major
        assert scale.stride() == (1, m) and scale_t.stride() == (1, k), (scale.stride(), scale_t.stride())
        for name in ("rows", "cols"):
            (q_got, s_got), (q_want, s_want) = got[name], want[name]
            assert q_got.dtype == FP8_DTYPE and q_got.shape == q_want.shape, (name, q_got.shape)
            torch.testing.assert_close(s_got, s_want, rtol=0, atol=0)
            # The interpreter's float8 rounding is not IEEE-exact (it can halve a power of two and flush
            # subnormals), so the values are checked for place and sign: every normal e4m3 value of the reference
            # (|q| >= 2^-6) has one of the same sign within a factor of two at the same place.
            got_v, want_v = q_got.float(), q_want.float()
            normal = want_v.abs() >= 2**-6
            ratio = got_v[normal] / want_v[normal]
            assert bool(((ratio >= 0.5) & (ratio <= 2.0)).all()), (name, m, k)
        assert torch.equal(dequantize_blocks(q_t, scale_t, (1, 128)).t()[:, 7], torch.zeros(m))
    print("ok")
    """
)


def test_triton_rows_and_columns_quantisation_matches_reference_in_interpreter(run_in_triton_interpreter):
    """One pass gives both tilings of an activation: the 1×128 row tiles and the 128×1 column tiles laid out for
    xᵀ, with the reference's scales exactly and its values within the interpreter's float8 rounding."""
    run_in_triton_interpreter(ROWS_AND_COLUMNS)
