"""Block-scaled FP8 as DeepSeek-V3 trains and ships it (report §3.3): the format, its quantisation and its GEMM.

Quantisation. A tensor is cut into tiles and every tile gets its own float32 scale `s = amax(|tile|) / 448`, so the
tile's largest element maps onto e4m3's largest finite value; the stored value is `q = e4m3(x · (1/s))` (one
reciprocal per tile and a product per element, which the GPU kernels compute at memory speed where a division per
element was compute-bound; round to nearest even) and `x ≈ q * s`. Activations use 1×128 tiles along the reduction
dimension K, weights 128×128 blocks. V3 checkpoints store a weight as `weight` (e4m3, [N, K]) plus
`weight_scale_inv` (float32, [ceil(N/128), ceil(K/128)]): the multiplier that dequantises, `w = q * s`.

GEMM. With A's scales per 1×128 tile and B's per 128×128 block, C = A Bᵀ splits into 128-deep products:

    C[m, n] = Σ_k-blocks  sA[m, kb] · sB[n // 128, kb] · Σ_{k in kb} qA[m, k] · qB[n, k]

The inner sum runs on FP8 tensor cores, the outer sum in float32 (the report's promotion every 128
elements). `fp8_block_matmul` dispatches on CUDA to cuBLAS's block-scaled FP8 GEMM (`torch._scaled_mm`, after a
one-time self-check that it reads DeepSeek's scales right), else to our Triton kernel, and elsewhere to a
dequantise-then-float32-matmul reference; all compute the same function up to float32 summation order.

Layers that train and run with this format: `posttrain.model.fp8_linear`.
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Smallest amax used for a scale: keeps `amax / 448` a normal float32 for an all-zero tile.
AMAX_FLOOR = FP8_MAX * torch.finfo(torch.float32).tiny


def _use_triton(*tensors: torch.Tensor) -> bool:
    if not all(t.is_cuda for t in tensors):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def quantize_blocks(
    x: torch.Tensor, tile: tuple[int, int], transpose: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D tensor [R, C] to e4m3 with one float32 scale per `tile` (rows, cols).

    Returns (q, scale): q [R, C] e4m3 and scale [ceil(R/tr), ceil(C/tc)] with x ≈ q * scale per tile.
    Edge tiles are partial (as if zero-padded). With `transpose`, returns the same numbers laid out for xᵀ:
    q [C, R] and scale [ceil(C/tc), ceil(R/tr)] — the layout the GEMM wants when R is its reduction dimension.

    Eagerly on CUDA this is one Triton pass. Under `torch.compile` it is the PyTorch expression below, which
    Inductor fuses into the kernel that produces x (activations that train take `quantize_rows_and_columns`
    instead, whose transposed tiling Inductor's code did not write at memory speed).
    """
    _check_2d("x", x)
    if not torch.compiler.is_compiling() and _use_triton(x):
        from posttrain.model.kernels import quantize_tiles

        q, scale, q_t, scale_t = quantize_tiles(x, tile, rows=not transpose, cols=transpose)
        return (q_t, scale_t) if transpose else (q, scale)
    if transpose:  # xᵀ's tiles are x's tiles transposed
        return quantize_blocks(x.t(), (tile[1], tile[0]))
    rows, cols = x.shape
    tile_r, tile_c = tile
    n_row_blocks, n_col_blocks = _ceil_div(rows, tile_r), _ceil_div(cols, tile_c)
    padded = F.pad(x.float(), (0, n_col_blocks * tile_c - cols, 0, n_row_blocks * tile_r - rows))
    tiles = padded.view(n_row_blocks, tile_r, n_col_blocks, tile_c)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp_min(AMAX_FLOOR)
    scale = amax / FP8_MAX
    q = (tiles * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(n_row_blocks * tile_r, n_col_blocks * tile_c)[:rows, :cols]
    return q.contiguous(), scale.view(n_row_blocks, n_col_blocks)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)  # stays an integer for symbolic sizes under torch.compile, unlike math.ceil(a / b)


def quantize_blocks_both_layouts(
    x: torch.Tensor, tile: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_blocks(x, tile)` and its `transpose=True` twin: (q, scale, q_t, scale_t).

    Square blocks make the transposed layout a transpose of the same numbers. (The one-pass Triton kernel that
    writes both layouts is not used for training: its dgrad gave NaN on the H100, 2026-11-24, cause not found.)
    """
    _check_2d("x", x)
    q, scale = quantize_blocks(x, tile)
    return q, scale, q.t().contiguous(), scale.t().contiguous()


@torch.library.custom_op("posttrain::fp8_quantize_rows_and_columns", mutates_args=())
def quantize_rows_and_columns(
    x: torch.Tensor, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An activation or a gradient x [M, K] in the two tilings a linear layer's GEMMs read: (q, scale) =
    `quantize_blocks(x, (1, block))` for the forward and dgrad GEMMs, and (q_t, scale_t) =
    `quantize_blocks(x, (block, 1), transpose=True)` for wgrad, which reduces over tokens.

    One Triton pass over x on CUDA (`posttrain.model.kernels.quantize_rows_and_columns`). The scales come in the
    column-major layouts cuBLAS's block-scaled GEMM reads (scale [M, K/block] with strides (1, M), scale_t
    [K, M/block] with strides (1, K)), so no GEMM copies them. One opaque operator under `torch.compile`: its
    producer writes x once and this pass reads it once, where Inductor's own code for the transposed tiling
    took several passes (bench/fp8_block_gpu.py).
    """
    _check_2d("x", x)
    if _use_triton(x):
        from posttrain.model import kernels

        return kernels.quantize_rows_and_columns(x, block)
    q, scale = quantize_blocks(x, (1, block))
    q_t, scale_t = quantize_blocks(x, (block, 1), transpose=True)
    return q, _column_major(scale), q_t, _column_major(scale_t)


@quantize_rows_and_columns.register_fake
def _quantize_rows_and_columns_shapes(
    x: torch.Tensor, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (m, k), f32 = x.shape, torch.float32
    q = x.new_empty((m, k), dtype=FP8_DTYPE)
    q_t = x.new_empty((k, m), dtype=FP8_DTYPE)
    scale = x.new_empty_strided((m, _ceil_div(k, block)), (1, m), dtype=f32)
    scale_t = x.new_empty_strided((k, _ceil_div(m, block)), (1, k), dtype=f32)
    return q, scale, q_t, scale_t


def _column_major(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.shape, (1, t.shape[0]), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Inverse of `quantize_blocks`: float32 q * scale, each scale spread over its tile."""
    _check_2d("q", q)
    rows, cols = q.shape
    expected = (_ceil_div(rows, tile[0]), _ceil_div(cols, tile[1]))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)}, expected {expected} for q {tuple(q.shape)} and tile {tile}"
        )
    spread = scale.float().repeat_interleave(tile[0], dim=0)[:rows].repeat_interleave(tile[1], dim=1)
    return q.float() * spread[:, :cols]


def quantize_activation(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] e4m3, scale [..., ceil(K/block)] float32): one scale per 1×block tile."""
    q, scale = quantize_blocks(x.reshape(-1, x.shape[-1]), (1, block))
    return q.view(x.shape), scale.view(*x.shape[:-1], scale.shape[-1])


def quantize_weight(
    weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (weight e4m3 [N, K], weight_scale_inv [ceil(N/bn), ceil(K/bk)]), V3's checkpoint format."""
    return quantize_blocks(weight, block_size)


def dequantize_weight(
    weight: torch.Tensor, weight_scale_inv: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """V3 checkpoint weight -> float32 [N, K]: w = weight * weight_scale_inv per block."""
    return dequantize_blocks(weight, weight_scale_inv, block_size)


def fp8_block_matmul(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    block_k: int = 128,
) -> torch.Tensor:
    """C [M, N] = dequant(A) @ dequant(B)ᵀ with float32 accumulation.

    a_q [M, K] e4m3 with a_scale [M, ceil(K/block_k)] (1×block_k tiles); b_q [N, K] e4m3 with b_scale either
    [ceil(N/block_k), ceil(K/block_k)] (square blocks: a weight) or [N, ceil(K/block_k)] (1×block_k tiles: an
    activation, as in the weight-gradient GEMM). cuBLAS or Triton on CUDA; elsewhere the reference.
    """
    for name, t in (("a_q", a_q), ("a_scale", a_scale), ("b_q", b_q), ("b_scale", b_scale)):
        _check_2d(name, t)
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE:
        raise TypeError(f"a_q and b_q must be {FP8_DTYPE}, got {a_q.dtype} and {b_q.dtype}")
    (m, k), n = a_q.shape, b_q.shape[0]
    if b_q.shape[1] != k:
        raise ValueError(f"a_q {tuple(a_q.shape)} and b_q {tuple(b_q.shape)} disagree on K")
    k_blocks = _ceil_div(k, block_k)
    if tuple(a_scale.shape) != (m, k_blocks):
        raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}, expected {(m, k_blocks)}")
    if tuple(b_scale.shape) == (n, k_blocks):
        b_scale_rows = 1
    elif tuple(b_scale.shape) == (_ceil_div(n, block_k), k_blocks):
        b_scale_rows = block_k
    else:
        raise ValueError(
            f"b_scale has shape {tuple(b_scale.shape)}, expected {(n, k_blocks)} (per row) "
            f"or {(_ceil_div(n, block_k), k_blocks)} (per {block_k}×{block_k} block)"
        )
    return torch.ops.posttrain.fp8_block_mm(a_q, a_scale, b_q, b_scale, b_scale_rows, out_dtype, block_k)


@torch.library.custom_op("posttrain::fp8_block_mm", mutates_args=())
def _fp8_block_mm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    b_scale_rows: int,
    out_dtype: torch.dtype,
    block_k: int,
) -> torch.Tensor:
    """`fp8_block_matmul`'s backend, chosen from the concrete shapes at run time. One opaque operator for
    `torch.compile`, so that a compiled block keeps its FP8 GEMMs in the graph (no graph break); the fake below
    (the same signature, as torch.library requires) gives Inductor the output's shape."""
    (m, k), n = a_q.shape, b_q.shape[0]
    if (
        a_q.is_cuda
        and _cublas_takes_shape(m, n, k, b_scale_rows, block_k)
        and _cublas_block_scaling_works(a_q.device, b_scale_rows, out_dtype)
    ):
        return cublas_block_matmul(a_q, a_scale, b_q, b_scale, b_scale_rows, out_dtype)
    if _use_triton(a_q, b_q):
        from posttrain.model.kernels import fp8_block_gemm

        return fp8_block_gemm(a_q, a_scale, b_q, b_scale, b_scale_rows, block_k, out_dtype)
    return _reference_block_matmul(a_q, a_scale, b_q, b_scale, b_scale_rows, out_dtype, block_k)


@_fp8_block_mm.register_fake
def _fp8_block_mm_shape(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    b_scale_rows: int,
    out_dtype: torch.dtype,
    block_k: int,
) -> torch.Tensor:
    return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


def _reference_block_matmul(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    b_scale_rows: int,
    out_dtype: torch.dtype,
    block_k: int = 128,
) -> torch.Tensor:
    a = dequantize_blocks(a_q, a_scale, (1, block_k))
    b = dequantize_blocks(b_q, b_scale, (b_scale_rows, block_k))
    return (a @ b.t()).to(out_dtype)


def cublas_block_matmul(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    b_scale_rows: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`fp8_block_matmul` through `torch._scaled_mm`'s block-wise modes (cuBLAS, Hopper and later).

    ATen's convention: C = A @ B with B [K, N] column-major (our b_q [N, K] transposed, no copy), scale_a
    [M, K/128] stored M-major, scale_b [K/128, N/128] for 128×128 blocks or [K/128, N] for 1×128 tiles — the
    transposes of DeepSeek's [N/128, K/128] and [N, K/128] layouts.
    """
    scale_a = a_scale.t().contiguous().t()
    scale_b = b_scale.t() if b_scale_rows > 1 else b_scale.t().contiguous()
    return torch._scaled_mm(a_q, b_q.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)


def _cublas_takes_shape(m: int, n: int, k: int, b_scale_rows: int, block_k: int) -> bool:
    """Whole blocks only, and with 128×128 scales only when the scale grid's sides are multiples of 4: on the
    H100 (torch 2.11) K = 384 was accepted and computed wrongly (relative error 0.4)."""
    if block_k != 128 or m % 16:
        return False
    if b_scale_rows > 1:
        return k % 512 == 0 and n % 512 == 0
    return k % 128 == 0 and n % 16 == 0


_CUBLAS_BLOCK_SCALING: dict[tuple[str, int, torch.dtype], bool] = {}


def _cublas_block_scaling_works(device: torch.device, b_scale_rows: int, out_dtype: torch.dtype) -> bool:
    """Whether this torch/cuBLAS computes block-scaled GEMMs right, found once per (device, B's scaling, output
    dtype) on a small random problem against the reference: older stacks refuse block-wise scales, and a stack
    that accepted them but read the scales differently must never be trusted silently."""
    key = (str(device), b_scale_rows, out_dtype)
    if key not in _CUBLAS_BLOCK_SCALING:
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(256, 512, device=device, generator=generator)
        b = torch.randn(512, 512, device=device, generator=generator) * torch.rand(512, 1, device=device) * 9
        a_q, a_scale = quantize_blocks(a, (1, 128))
        b_q, b_scale = quantize_blocks(b, (b_scale_rows, 128))
        try:
            out = cublas_block_matmul(a_q, a_scale, b_q, b_scale, b_scale_rows, out_dtype).float()
        except RuntimeError:
            _CUBLAS_BLOCK_SCALING[key] = False
        else:
            ref = _reference_block_matmul(a_q, a_scale, b_q, b_scale, b_scale_rows, torch.float32)
            tolerance = 1e-2 if out_dtype == torch.bfloat16 else 1e-3
            _CUBLAS_BLOCK_SCALING[key] = bool(((out - ref).norm() / ref.norm()) < tolerance)
    return _CUBLAS_BLOCK_SCALING[key]
