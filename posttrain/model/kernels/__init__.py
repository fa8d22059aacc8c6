"""GPU kernels (Triton). Import this package only where Triton and a CUDA tensor are at hand:
`posttrain.model.fp8` does so lazily, and falls back to its PyTorch reference elsewhere."""

from posttrain.model.kernels.fp8 import fp8_block_gemm, quantize_rows_and_columns, quantize_tiles

__all__ = ["fp8_block_gemm", "quantize_rows_and_columns", "quantize_tiles"]
