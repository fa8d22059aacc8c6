"""Attention over packed rows through cumulative sequence lengths instead of a dense [S, S] mask.

A packed row holds several samples whose position ids restart at 0. transformers' "sdpa" path turns that into
a block-diagonal [B, 1, S, S] mask (materialised; SDPA then leaves its flash kernel for a slower masked one).
Here the samples are described by `cu_seqlens`, the offsets of each sample in the flattened B·S tokens, and
attention runs per sample: on CUDA through `torch.nn.attention.varlen.varlen_attn` (FlashAttention's varlen
kernel), elsewhere through SDPA on each sample in turn (exact, for CPU tests and small runs).

Sample boundaries follow the rule of `posttrain.algorithms.sft.shifted_targets`: token j starts a new sample
unless position_ids[j] = position_ids[j − 1] + 1 in the same row.

Use: `register_varlen_attention()` once, then load the model with `attn_implementation=VARLEN_ATTENTION` and
call it with `**packed_attention_kwargs(position_ids)` (computed once per forward, not once per layer).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "posttrain_varlen"

try:  # torch >= 2.10; its keyword arguments changed between releases, so read them once here
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, _VARLEN_PARAMS = None, frozenset()


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Offsets of every sample in the flattened [B·S] tokens (int32 [n + 1], from 0 to B·S) and the longest."""
    if position_ids.ndim != 2:
        raise ValueError(f"position_ids must be [B, S], got shape {tuple(position_ids.shape)}")
    batch, seq = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    offsets = torch.nonzero(starts.reshape(-1)).squeeze(1)
    end = torch.tensor([batch * seq], device=offsets.device, dtype=offsets.dtype)
    cu_seqlens = torch.cat([offsets, end]).to(torch.int32)
    return cu_seqlens, int(cu_seqlens.diff().max())


def packed_attention_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for a transformers model's forward (the names its flash-attention path reads too)."""
    cu_seqlens, longest = cu_seqlens_from_position_ids(position_ids)
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def _per_sample_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        sample = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # [H, L, D]
        attended = F.scaled_dot_product_attention(*sample, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = attended.transpose(0, 1)
    return out


def _flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    if varlen_attn is None:
        raise RuntimeError(f"{VARLEN_ATTENTION} on CUDA needs torch.nn.attention.varlen (torch >= 2.10)")
    kwargs: dict[str, Any] = {}
    # torch 2.10/2.11 take `is_causal` and equal head counts; later releases a (left, right) window, a scale
    # and grouped KV heads.
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "enable_gqa" in _VARLEN_PARAMS:
        kwargs["enable_gqa"] = True
    else:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in _VARLEN_PARAMS:
        kwargs["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, **kwargs)


def varlen_attention(
    module: torch.nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: q [B, H, S, D], k/v [B, H_kv, S, D] -> ([B, S, H, D], None)."""
    if attention_mask is not None:
        raise ValueError(
            f"{VARLEN_ATTENTION} attends within packed samples; pass position_ids, not attention_mask"
        )
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION} has no attention dropout (got {dropout})")
    cu_seqlens, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None:
        if kwargs.get("position_ids") is None:
            raise ValueError(f"{VARLEN_ATTENTION} needs position_ids or cu_seq_lens_q/max_length_q")
        cu_seqlens, longest = cu_seqlens_from_position_ids(kwargs["position_ids"])
    batch, heads, seq, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    q, k, v = (x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim) for x in (query, key, value))
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype
    if q.is_cuda and dtype in (torch.float16, torch.bfloat16):
        out = _flash_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu_seqlens, longest, scale)
    else:
        out = _per_sample_sdpa(q, k.to(q.dtype), v.to(q.dtype), cu_seqlens, scale)
    return out.reshape(batch, seq, heads, dim), None


def _no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"{VARLEN_ATTENTION} does not take padding masks: pack samples with restarting position_ids"
        )
    return None


def register_varlen_attention() -> str:
    """Make `attn_implementation=VARLEN_ATTENTION` available to transformers models; returns that name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _no_mask)
    return VARLEN_ATTENTION
