"""Attention over packed rows through cumulative sequence lengths instead of a dense [S, S] mask.

A packed row holds several samples whose position ids restart at 0. transformers' "sdpa" path turns that into
a block-diagonal [B, 1, S, S] mask (materialised; SDPA then leaves its flash kernel for a slower masked one).
Here the samples are described by `cu_seqlens`, the offsets of each sample in the flattened B·S tokens, and
attention runs per sample: on CUDA through `torch.nn.attention.varlen.varlen_attn` (FlashAttention's varlen
kernel), elsewhere through one SDPA call over the samples laid out as the rows of a padded batch (exact; on
CPU several times faster than SDPA under the dense block-diagonal mask, whose cost grows with the square of the
packed row rather than of each sample).

Sample boundaries follow the rule of `posttrain.algorithms.sft.shifted_targets`: token j starts a new sample
unless position_ids[j] = position_ids[j − 1] + 1 in the same row.

Use: `register_varlen_attention()` once, then load the model with `attn_implementation=VARLEN_ATTENTION` and
call it with `**packed_attention_kwargs(position_ids, cu_seqlens)` (computed once per forward, not once per
layer). posttrain's own DeepSeek-V3 calls `packed_attention` directly with `PackedSamples`.

No GPU→host sync in a training step: the offsets come from the data loader, which knows every sample's length
on the host (`posttrain.data.packing.collate_packs`), and the bound on the sample length that the varlen kernel
sizes its grid by is the row length S, not the longest sample (reading that would wait for the GPU, and as a
Python int that changes from batch to batch it would recompile compiled blocks; the kernel's programs for rows
past a sample's end return at once). Only when no offsets are given are they found from the position ids, at
the cost of one sync (`torch.nonzero`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "posttrain_varlen"
# Padded rows with a [B, S] padding mask, attended as flash-attention's transformers path does: the real tokens are
# gathered by the mask (unpadded), attended through the same varlen kernel, and scattered back (pads get zeros).
UNPAD_VARLEN_ATTENTION = "posttrain_varlen_unpad"

try:  # torch >= 2.10; its keyword arguments changed between releases, so read them once here
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, _VARLEN_PARAMS = None, frozenset()


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Offsets of every sample in the flattened [B·S] tokens (int32 [n + 1], from 0 to B·S) and the longest.

    Two GPU→host syncs (the offsets' count, the longest): what transformers' flash-attention path does when it
    is given position ids alone. The training steps use `PackedSamples.of_rows`, which needs neither."""
    cu_seqlens = _sample_offsets(position_ids)
    return cu_seqlens, int(cu_seqlens.diff().max())


def _sample_offsets(position_ids: torch.Tensor) -> torch.Tensor:
    if position_ids.ndim != 2:
        raise ValueError(f"position_ids must be [B, S], got shape {tuple(position_ids.shape)}")
    batch, seq = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    offsets = torch.nonzero(starts.reshape(-1)).squeeze(1)
    end = torch.tensor([batch * seq], device=offsets.device, dtype=offsets.dtype)
    return torch.cat([offsets, end]).to(torch.int32)


@dataclass(frozen=True)
class PackedSamples:
    """The samples of packed rows as varlen kernels see them: offsets into the flattened B·S tokens, and a bound
    on every sample's length (the row length S; see the module docstring)."""

    cu_seqlens: torch.Tensor
    max_length: int

    @classmethod
    def of_rows(cls, position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> PackedSamples:
        """The samples of rows [B, S]: `cu_seqlens` as the data loader computed it, or (None) found from
        `position_ids`, with one GPU→host sync."""
        if position_ids.ndim != 2:
            raise ValueError(f"position_ids must be [B, S], got shape {tuple(position_ids.shape)}")
        if cu_seqlens is None:
            cu_seqlens = _sample_offsets(position_ids)
        elif cu_seqlens.ndim != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError(
                f"cu_seqlens must be int32 [n + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        return cls(cu_seqlens, position_ids.shape[1])


def packed_attention_kwargs(
    position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> dict[str, Any]:
    """Keyword arguments for a transformers model's forward (the names its flash-attention path reads too);
    `cu_seqlens` as in `PackedSamples.of_rows`."""
    samples = PackedSamples.of_rows(position_ids, cu_seqlens)
    return {
        "cu_seq_lens_q": samples.cu_seqlens,
        "cu_seq_lens_k": samples.cu_seqlens,
        "max_length_q": samples.max_length,
        "max_length_k": samples.max_length,
    }


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_length: int, scale: float
) -> torch.Tensor:
    """Causal attention within each packed sample over the flattened tokens: q [T, H, D], k [T, H_kv, D],
    v [T, H_kv, D_v] (D_v may differ from D, as in MLA) -> [T, H, D_v]; no sample is longer than `max_length`.
    On CUDA in half precision (or under autocast) FlashAttention's varlen kernel; otherwise SDPA over the
    samples as a padded batch (exact)."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else v.dtype
    if q.is_cuda and dtype in (torch.float16, torch.bfloat16):
        return _flash_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu_seqlens, max_length, scale)
    return _per_sample_sdpa(q, k.to(q.dtype), v.to(q.dtype), cu_seqlens, scale)


# A padded batch of samples may hold at most this many slots per real token; past it, one SDPA call per sample.
MAX_PADDING_RATIO = 2


def _per_sample_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention within each sample of the flattened tokens through SDPA: the samples as the rows of one
    padded batch, or, when their lengths are so uneven that the batch would be mostly padding, one at a time."""
    lengths = cu_seqlens.diff()
    if len(lengths) * int(lengths.max()) > MAX_PADDING_RATIO * q.shape[0]:
        return _sample_by_sample_sdpa(q, k, v, cu_seqlens, scale)
    return _padded_batch_sdpa(q, k, v, cu_seqlens, scale)


def _padded_batch_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """The n samples as the rows of an [n, longest] batch, each right-padded with zeros, in one causal SDPA call:
    a real query never sees the padding after it, so the result is exact. v is zero-padded to the q/k head dim
    (zero output columns, sliced off again) so that SDPA can take its fused CPU kernel, which wants one head dim
    (MLA's v is narrower); with two head dims it falls back to its unfused math path."""
    lengths = cu_seqlens.diff().long()
    count, longest, tokens = len(lengths), int(lengths.max()), q.shape[0]
    sample = torch.repeat_interleave(torch.arange(count, device=q.device), lengths)
    # token t of sample s goes to slot s * longest + (t - first token of s)
    slot = torch.arange(tokens, device=q.device) + sample * longest - cu_seqlens[:-1].long()[sample]
    value_dim = v.shape[-1]
    if value_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - value_dim))

    def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [n, H, longest, D]
        rows = x.new_zeros(count * longest, *x.shape[1:]).index_copy(0, slot, x)
        return rows.view(count, longest, *x.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        padded(q), padded(k), padded(v), is_causal=True, scale=scale, enable_gqa=True
    )
    out = out.transpose(1, 2).reshape(count * longest, out.shape[1], out.shape[-1])
    return out.index_select(0, slot)[..., :value_dim]


def _sample_by_sample_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        sample = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # [H, L, D]
        attended = F.scaled_dot_product_attention(*sample, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = attended.transpose(0, 1)
    return out


def _flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_length: int, scale: float
) -> torch.Tensor:
    if varlen_attn is None:
        raise RuntimeError(f"{VARLEN_ATTENTION} on CUDA needs torch.nn.attention.varlen (torch >= 2.10)")
    # The kernel takes one head dim for q, k and v. A narrower v (MLA: 128 vs q/k's 192) gets zero columns, which
    # give zero output columns, sliced off again: exact, gradients included.
    value_dim = v.shape[-1]
    if value_dim > q.shape[-1]:
        raise ValueError(f"value head dim {value_dim} exceeds the query/key head dim {q.shape[-1]}")
    if value_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - value_dim))
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
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **kwargs)
    return out[..., :value_dim] if value_dim < out.shape[-1] else out


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
    """transformers' attention-function contract: q/k [B, H(_kv), S, D], v [B, H_kv, S, D_v] -> ([B, S, H, D_v],
    None)."""
    if attention_mask is not None:
        raise ValueError(
            f"{VARLEN_ATTENTION} attends within packed samples; pass position_ids, not attention_mask"
        )
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION} has no attention dropout (got {dropout})")
    cu_seqlens, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None:
        if kwargs.get("position_ids") is None:
            raise ValueError(f"{VARLEN_ATTENTION} needs position_ids or cu_seq_lens_q/max_length_q")
        cu_seqlens, max_length = cu_seqlens_from_position_ids(kwargs["position_ids"])
    batch, heads, seq, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    out = packed_attention(*_tokens_first(query, key, value), cu_seqlens, max_length, scale)
    return out.reshape(batch, seq, heads, out.shape[-1]), None


def _tokens_first(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """[B, H, S, D] -> [B·S, H, D], the flattened tokens as `packed_attention` takes them."""
    return [x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1]) for x in tensors]


def unpadded_varlen_attention(
    module: torch.nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract over padded rows: `attention_mask` [B, S] (1 = real token, each
    row's real tokens contiguous, left or right padding) or None (no padding). -> ([B, S, H, D_v], None).

    Decoding over a KV cache (fewer queries than keys: the queries are each row's newest positions) goes to SDPA
    with the padding mask, as flash-attention's own decoding path attends over the cache without unpadding."""
    if attention_mask is None:  # no padding: each row is one sequence
        attention_mask = torch.ones(query.shape[0], key.shape[2], dtype=torch.int32, device=query.device)
    if dropout:
        raise ValueError(f"{UNPAD_VARLEN_ATTENTION} has no attention dropout (got {dropout})")
    if attention_mask.ndim != 2 or attention_mask.shape[1] != key.shape[2]:
        raise ValueError(
            f"{UNPAD_VARLEN_ATTENTION} takes a [B, S] padding mask over the {key.shape[2]} keys, got "
            f"{tuple(attention_mask.shape)}"
        )
    if query.shape[2] < key.shape[2]:
        return _cached_decoding_attention(query, key, value, attention_mask.bool(), scaling)
    batch, heads, seq, dim = query.shape
    real = attention_mask.reshape(-1).bool()
    lengths = attention_mask.sum(1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    q, k, v = (x[real] for x in _tokens_first(query, key, value))
    out = packed_attention(
        q, k, v, cu_seqlens, int(lengths.max()), scaling if scaling is not None else dim**-0.5
    )
    padded = out.new_zeros(batch * seq, heads, out.shape[-1])
    padded[real] = out
    return padded.view(batch, seq, heads, out.shape[-1]), None


def _cached_decoding_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, real: torch.Tensor, scaling: float | None
) -> tuple[torch.Tensor, None]:
    """Queries [B, H, q, D] at the last q of L key positions [B, H_kv, L, D]: query i sees the real keys up to
    position L - q + i."""
    queries, keys = query.shape[2], key.shape[2]
    causal = (
        torch.arange(keys, device=query.device)
        <= torch.arange(keys - queries, keys, device=query.device)[:, None]
    )
    out = grouped_query_attention(query, key, value, real[:, None, None, :] & causal, scaling)
    return out.transpose(1, 2).contiguous(), None


def grouped_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    scale: float | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA of q [B, H, q, D] over grouped K/V heads k/v [B, H_kv, L, D] under a mask `allowed` [B, 1, q or 1, L]
    (True = attend) -> [B, H, q, D_v], without copying K/V once per query head: the G = H/H_kv query heads that
    share a K/V head (heads h = j·G + g, transformers' order) become G·q queries of that head, one SDPA call that
    reads the cache once. For decoding, where the copy costs more than the attention."""
    batch, heads, queries, dim = query.shape
    groups = heads // key.shape[1]
    folded = query.reshape(batch, key.shape[1], groups * queries, dim)
    if allowed.shape[2] > 1:  # each query's mask row, repeated for each head of its group
        allowed = allowed[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * queries, -1)
    out = F.scaled_dot_product_attention(
        folded, key, value, attn_mask=allowed, dropout_p=dropout, scale=scale
    )
    return out.reshape(batch, heads, queries, out.shape[-1])


def _padding_mask(
    *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> torch.Tensor | None:
    """The [B, S] padding mask as given (None when nothing is padded), as transformers' flash-attention mask."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def _no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"{VARLEN_ATTENTION} does not take padding masks: pack samples with restarting position_ids"
        )
    return None


def register_varlen_attention() -> str:
    """Make `attn_implementation=VARLEN_ATTENTION` (packed rows) and `UNPAD_VARLEN_ATTENTION` (padded rows)
    available to transformers models; returns the first name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _no_mask)
    AttentionInterface.register(UNPAD_VARLEN_ATTENTION, unpadded_varlen_attention)
    AttentionMaskInterface.register(UNPAD_VARLEN_ATTENTION, _padding_mask)
    return VARLEN_ATTENTION
