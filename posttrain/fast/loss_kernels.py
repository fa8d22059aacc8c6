"""Triton kernels for the loss over the output head's logits: one program per row, online softmax over the vocab.

Each kernel reads a row of logits z [V] (the head GEMM's output, bf16 or fp32) and does all of its float32 work
in registers, so no float32 [rows, V] tensor and no separate exp/sub/mul/copy passes exist:

- `cross_entropy_rows_`: pass 1 finds m = max z and s = Σ exp(z − m) together (rescaling s whenever m grows),
  lse = m + log s, loss = lse − z_y; pass 2 overwrites the row in place with ∂loss/∂z = softmax(z) − onehot(y)
  in the row's own dtype (0 on rows whose target is IGNORE_INDEX).
- `logprob_entropy_rows`: one pass with z' = z / T: m, s and t = Σ exp(z' − m) z' online, so that
  lse = m + log s,  log p_y = z'_y − lse,  H = lse − t / s  (= −Σ p log p); no gradient written.
- `logprob_entropy_grad_rows_`: from the saved lse and H, one pass overwriting the row with
  ∂/∂z (g_lp · log p_y + g_H · H) = [g_lp (onehot(y) − p) − g_H p (log p + H)] / T.

The kernels run wherever Triton runs: on CUDA, and on CPU under TRITON_INTERPRET=1 (how tests check them).
"""

# ruff: noqa: ANN001  -- the arguments of @triton.jit kernels are pointers and ints that Triton types itself
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # columns per iteration of a row's loop: 16 KiB of fp32 in registers across 8 warps
NUM_WARPS = 8


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, stride, targets_ptr, loss_ptr, lse_ptr, n_cols, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    m = -float("inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        m = new_m
    lse = m + tl.log(s)
    safe_target = tl.where(valid, target, 0)
    z_target = tl.load(row_ptr + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(row_ptr + cols, (grad * keep).to(logits_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _logprob_entropy_kernel(
    logits_ptr, stride, targets_ptr, logp_ptr, entropy_ptr, lse_ptr, n_cols, inv_temperature,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        z = tl.load(row_ptr + cols, mask=in_row, other=-float("inf")).to(tl.float32) * inv_temperature
        new_m = tl.maximum(m, tl.max(z, axis=0))
        rescale = tl.exp(m - new_m)
        e = tl.exp(z - new_m)
        s = s * rescale + tl.sum(e, axis=0)
        t = t * rescale + tl.sum(e * tl.where(in_row, z, 0.0), axis=0)  # padding lanes: e = 0, z := 0
        m = new_m
    lse = m + tl.log(s)
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temperature
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(entropy_ptr + row, lse - t / s)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprob_entropy_grad_kernel(
    logits_ptr, stride, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, n_cols,
    inv_temperature, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row) * inv_temperature
    g_entropy = tl.load(grad_entropy_ptr + row) * inv_temperature
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        log_p = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature - lse
        p = tl.exp(log_p)
        grad = g_logp * (tl.where(cols == target, 1.0, 0.0) - p) - g_entropy * p * (log_p + entropy)
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def _check_rows(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, V] with contiguous rows, got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [{logits.shape[0]}], got {tuple(targets.shape)}")


def _block(n_cols: int) -> int:
    return min(BLOCK_V, triton.next_power_of_2(n_cols))


def cross_entropy_rows_(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy [rows] float32 (0 where targets == ignore_index) and the rows' logsumexp; with
    `write_grad`, `logits` is overwritten by softmax − onehot (zero rows where ignored)."""
    _check_rows(logits, targets)
    rows, n_cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    if rows:
        _cross_entropy_kernel[(rows,)](
            logits, logits.stride(0), targets, loss, lse, n_cols, ignore_index,
            WRITE_GRAD=write_grad, BLOCK=_block(n_cols), num_warps=NUM_WARPS,
        )  # fmt: skip
    return loss, lse


def logprob_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log softmax(z / T)[y], the entropy of softmax(z / T) and logsumexp(z / T), each [rows] float32."""
    _check_rows(logits, targets)
    rows, n_cols = logits.shape
    logp, entropy, lse = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    if rows:
        _logprob_entropy_kernel[(rows,)](
            logits, logits.stride(0), targets, logp, entropy, lse, n_cols, 1.0 / temperature,
            BLOCK=_block(n_cols), num_warps=NUM_WARPS,
        )  # fmt: skip
    return logp, entropy, lse


def logprob_entropy_grad_rows_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
) -> None:
    """Overwrite `logits` with ∂(Σ g_lp·log p_y + g_H·H)/∂z per row (see the module docstring)."""
    _check_rows(logits, targets)
    rows, n_cols = logits.shape
    if rows:
        _logprob_entropy_grad_kernel[(rows,)](
            logits, logits.stride(0), targets, lse, entropy, grad_logp.float().contiguous(),
            grad_entropy.float().contiguous(), n_cols, 1.0 / temperature,
            BLOCK=_block(n_cols), num_warps=NUM_WARPS,
        )  # fmt: skip
