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
