"""Triton kernels for DeepSeek-V3-style block-scaled FP8 (report §3.3.2).

Three kernels:

- `quantize_tiles`: one pass over a 2-D tensor that gives every `tile` (1×128 for activations, 128×128 for
  weights, 128×1 for the token-wise tiles of the weight-gradient GEMM) its own float32 scale
  `amax / 448` and stores the e4m3 values, optionally transposed so that the reduction dimension of the
  GEMM that consumes them is the contiguous one.
- `quantize_rows_and_columns`: an activation (or its gradient) in both of the tilings a linear layer's GEMMs
  need, 1×128 row-major and 128×1 transposed, from one read of it.
- `fp8_block_gemm`: C = A @ B.T for e4m3 A [M, K] (scales per 1×128 tile) and B [N, K] (scales per 128×128
  block or per 1×128 tile). Each 128-wide K step is one tensor-core dot; its result is scaled and added to a
  float32 accumulator in registers, which is the "promotion to CUDA cores every 128 elements" of the report:
  the tensor cores' own FP8 accumulation (~14 bits) never spans more than 128 products.

The semantics are defined by the PyTorch reference in `posttrain.model.fp8`; the kernels reproduce the
quantisation bit for bit (IEEE reciprocal of each scale, then products; round-to-nearest-even; saturation at
±448) and the GEMM up to float32
summation order.
"""

# ruff: noqa: ANN001  -- the arguments of @triton.jit kernels are pointers and ints that Triton types itself
import torch
import triton
import triton.language as tl

# Same constants as the reference in posttrain.model.fp8 (constexpr: a Triton kernel may read no other globals).
FP8_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(448.0 * torch.finfo(torch.float32).tiny)


@triton.jit
def _quantize_tiles_kernel(
    x_ptr,
    q_rows_ptr,
    q_cols_ptr,
    s_ptr,
    R,
    C,
    stride_xr,
    stride_s_row_block,
    stride_s_col_block,
    TILE_R: tl.constexpr,
    TILE_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    STORE_ROWS: tl.constexpr,
    STORE_COLS: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
    # Out-of-range elements load as 0, exactly like the zero padding of the reference.
    if TILE_R == 1:  # one scale per row of the block (1×BLOCK_C tiles)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR)
        scale = tl.math.div_rn(amax, FP8_MAX)
        y = x * tl.math.div_rn(1.0, scale)[:, None]
        tl.store(s_ptr + offs_r * stride_s_row_block + pid_c * stride_s_col_block, scale, mask=offs_r < R)
    elif TILE_C == 1:  # one scale per column of the block (BLOCK_R×1 tiles)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), AMAX_FLOOR)
        scale = tl.math.div_rn(amax, FP8_MAX)
        y = x * tl.math.div_rn(1.0, scale)[None, :]
        tl.store(s_ptr + pid_r * stride_s_row_block + offs_c * stride_s_col_block, scale, mask=offs_c < C)
    else:  # one scale for the whole BLOCK_R×BLOCK_C block
        amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), AMAX_FLOOR)
        scale = tl.math.div_rn(amax, FP8_MAX)
        y = x * tl.math.div_rn(1.0, scale)
        tl.store(s_ptr + pid_r * stride_s_row_block + pid_c * stride_s_col_block, scale)
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    if STORE_ROWS:  # q [R, C]
        tl.store(
            q_rows_ptr + offs_r[:, None] * C + offs_c[None, :], y.to(q_rows_ptr.dtype.element_ty), mask=mask
        )
    if STORE_COLS:  # q.T [C, R]; transposing before the store keeps the writes coalesced
        tl.store(
            q_cols_ptr + offs_c[:, None] * R + offs_r[None, :],
            tl.trans(y).to(q_cols_ptr.dtype.element_ty),
            mask=(offs_c[:, None] < C) & (offs_r[None, :] < R),
        )


def quantize_tiles(
    x: torch.Tensor, tile: tuple[int, int], rows: bool = True, cols: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Block-quantise a 2-D CUDA tensor [R, C] in one pass; see `posttrain.model.fp8.quantize_blocks`.

    Returns (q, scale, q_t, scale_t): with `rows`, q [R, C] and scale [ceil(R/tr), ceil(C/tc)]; with `cols`,
    the same numbers laid out for x.T: q_t [C, R] and scale_t [ceil(C/tc), ceil(R/tr)]. The other pair is None.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows, n_cols = x.shape
    tile_r, tile_c = tile
    n_row_blocks, n_col_blocks = triton.cdiv(n_rows, tile_r), triton.cdiv(n_cols, tile_c)
    new = dict(dtype=torch.float8_e4m3fn, device=x.device)
    q = torch.empty((n_rows, n_cols), **new) if rows else None
    q_t = torch.empty((n_cols, n_rows), **new) if cols else None
    # The kernel writes the scales in one layout; with both, the transposed one is a copy of a tiny tensor.
    if rows:
        scale = torch.empty((n_row_blocks, n_col_blocks), dtype=torch.float32, device=x.device)
        stride_s_row_block, stride_s_col_block = n_col_blocks, 1
    else:
        scale = torch.empty((n_col_blocks, n_row_blocks), dtype=torch.float32, device=x.device)
        stride_s_row_block, stride_s_col_block = 1, n_row_blocks
    # A 1-wide tile side is processed 32 rows/columns per program to give each program enough work.
    block_r = tile_r if tile_r > 1 else 32
    block_c = tile_c if tile_c > 1 else 32
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    _quantize_tiles_kernel[grid](
        x,
        q if rows else q_t,
        q_t if cols else q,
        scale,
        n_rows,
        n_cols,
        x.stride(0),
        stride_s_row_block,
        stride_s_col_block,
        TILE_R=tile_r,
        TILE_C=tile_c,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        STORE_ROWS=rows,
        STORE_COLS=cols,
        num_warps=8 if block_r * block_c >= 128 * 128 else 4,
    )
    if not rows:
        return None, None, q_t, scale
    return q, scale, q_t, (scale.t().contiguous() if cols else None)


@triton.jit
def _quantize_rows_and_columns_kernel(
    x_ptr,
    q_ptr,
    q_t_ptr,
    s_rows_ptr,
    s_cols_ptr,
    M,
    K,
    stride_xm,
    BLOCK: tl.constexpr,
):
    # One BLOCK×BLOCK tile of x [M, K] per program: its 1×BLOCK row tiles and BLOCK×1 column tiles are both
    # whole inside it, so one read of x gives both quantisations.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    in_m, in_k = offs_m < M, offs_k < K
    mask = in_m[:, None] & in_k[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    row_scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), AMAX_FLOOR), FP8_MAX)
    col_scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), AMAX_FLOOR), FP8_MAX)
    rows = tl.minimum(tl.maximum(x * tl.math.div_rn(1.0, row_scale)[:, None], -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], rows.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_rows_ptr + pid_k * M + offs_m, row_scale, mask=in_m)  # [M, K/BLOCK] stored M-major
    cols = tl.minimum(tl.maximum(x * tl.math.div_rn(1.0, col_scale)[None, :], -FP8_MAX), FP8_MAX)
    tl.store(
        q_t_ptr + offs_k[:, None] * M + offs_m[None, :],
        tl.trans(cols.to(q_t_ptr.dtype.element_ty)),
        mask=in_k[:, None] & in_m[None, :],
    )
    tl.store(s_cols_ptr + pid_m * K + offs_k, col_scale, mask=in_k)  # [K, M/BLOCK] stored K-major


def quantize_rows_and_columns(
    x: torch.Tensor, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An activation x [M, K] quantised for all three GEMMs of a linear layer, in one pass over x.

    Returns (q, scale, q_t, scale_t): q [M, K] with scale [M, K/block] per 1×block tile (forward and dgrad), and
    q_t [K, M] with scale_t [K, M/block] per block×1 tile, the layout of xᵀ (wgrad reduces over tokens). The
    values are `quantize_blocks(x, (1, block))` and `quantize_blocks(x, (block, 1), transpose=True)`; the scales
    are stored in the column-major layouts cuBLAS's block-scaled GEMM reads, so it needs no copy of them.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    m_blocks, k_blocks = triton.cdiv(m, block), triton.cdiv(k, block)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    q_t = torch.empty((k, m), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty_strided((m, k_blocks), (1, m), dtype=torch.float32, device=x.device)
    scale_t = torch.empty_strided((k, m_blocks), (1, k), dtype=torch.float32, device=x.device)
    _quantize_rows_and_columns_kernel[(m_blocks, k_blocks)](
        x, q, q_t, scale, scale_t, m, k, x.stride(0), BLOCK=block, num_warps=8
    )
    return q, scale, q_t, scale_t


def _gemm_configs() -> list[triton.Config]:
    # (BLOCK_M, BLOCK_N, num_warps, num_stages): the winners among 8 tried on an H100 (2026-11-24);
    # 128×256, 256×128 and 128×64 tiles, 4-warp 128×128 tiles and 6 stages lost at every V3 shape.
    shapes = [(128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, w, s in shapes
    ]


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "B_SCALE_ROWS"])
@triton.heuristics({"EVEN_K": lambda meta: meta["K"] % meta["BLOCK_K"] == 0})
@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_am,
    stride_bn,
    stride_cm,
    stride_a_scale,
    stride_b_scale,
    B_SCALE_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks sweep the columns together, so B tiles are reused from L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    # Rows/columns past the edge wrap around (valid addresses); their results are masked at the store.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
    a_scale_ptrs = a_scale_ptr + offs_m * stride_a_scale
    # When the tile lies inside one block of B's scales (a weight, BLOCK_N <= 128), its scale is one number
    # per K step and folds into A's row scales: the promotion is then a single FMA per accumulator element.
    if B_SCALE_ROWS % BLOCK_N == 0:
        b_scale_ptrs = b_scale_ptr + (pid_n * BLOCK_N // B_SCALE_ROWS) * stride_b_scale
    else:
        b_scale_ptrs = b_scale_ptr + (offs_n // B_SCALE_ROWS) * stride_b_scale

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_block in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # past K the operands load as 0
            k_left = K - k_block * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a_scale = tl.load(a_scale_ptrs + k_block)
        b_scale = tl.load(b_scale_ptrs + k_block)
        # One 128-deep tensor-core product, then promotion: scale it and add it in float32.
        if B_SCALE_ROWS % BLOCK_N == 0:
            acc += tl.dot(a, b) * (a_scale * b_scale)[:, None]
        else:
            acc += tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
    c_ptrs = c_ptr + offs_cm[:, None] * stride_cm + offs_cn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def fp8_block_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    b_scale_rows: int,
    block_k: int,
    out_dtype: torch.dtype,
    config: dict | None = None,
) -> torch.Tensor:
    """C [M, N] = dequant(A) @ dequant(B).T on CUDA; shapes were validated by the caller.

    `config` (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages) fixes the launch instead of autotuning, for
    benchmarking one configuration and for running under TRITON_INTERPRET, which cannot time configurations.
    """
    a_q, b_q = (t if t.stride(-1) == 1 else t.contiguous() for t in (a_q, b_q))
    a_scale, b_scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (a_scale, b_scale))
    m, k = a_q.shape
    n = b_q.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a_q.device)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    # The autotuner wraps the heuristics, which wrap the jitted kernel: `.fn` skips the tuning.
    kernel = _fp8_block_gemm_kernel if config is None else _fp8_block_gemm_kernel.fn
    kernel[grid](
        a_q,
        b_q,
        c,
        a_scale,
        b_scale,
        m,
        n,
        k,
        triton.next_power_of_2(m),
        a_q.stride(0),
        b_q.stride(0),
        c.stride(0),
        a_scale.stride(0),
        b_scale.stride(0),
        B_SCALE_ROWS=b_scale_rows,
        BLOCK_K=block_k,
        **(config or {}),
    )
    return c
