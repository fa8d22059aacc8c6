"""Multi-head Latent Attention (DeepSeek-V3 report, Sec. 2.1.1, Eq. 1-11).

Keys and values of all heads come from one compressed latent per token, c_KV = W_DKV h (d_c = kv_lora_rank),
plus one RoPE key k^R = RoPE(W_KR h) (d_h^R = qk_rope_head_dim) shared by all heads:

    k^C_i = W_UK c_KV   (per head, d_h)       v^C_i = W_UV c_KV   (per head, d_h)
    k_i = [k^C_i ; k^R]                        q_i = [W_UQ c_Q ; RoPE(W_QR c_Q)],  c_Q = W_DQ h

Checkpoint names (transformers): kv_a_proj_with_mqa = [W_DKV ; W_KR], kv_a_layernorm normalises c_KV,
kv_b_proj = [W_UK ; W_UV] interleaved per head, q_a_proj = W_DQ, q_a_layernorm, q_b_proj = [W_UQ ; W_QR].

Two ways to attend, same numbers:
- training (`forward`): expand K/V for every head and call an attention kernel: FlashAttention's varlen kernel
  over the packed samples' offsets (`PackedSamples`, no mask; the CUDA default), or SDPA under the dense
  block-diagonal mask of packed samples;
- decoding (`forward_absorbed`): cache only c_KV and k^R (d_c + d_h^R = 576 numbers per token per layer at V3
  sizes) and attend in latent space: q^C_i W_UK is folded into the query (q_lat = W_UK^T q^C, so
  q^C . k^C = q_lat . c_KV) and W_UV is applied after the weighted sum of latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.fast.attention import PackedSamples, packed_attention
from posttrain.model.config import DeepseekV3Config
from posttrain.model.layers import RMSNorm, dense_weight, make_linear
from posttrain.model.rope import apply_rope


class LatentKVCache:
    """Per-layer c_KV [B, T, d_c] and RoPE key [B, T, d_h^R] of a batch of sequences, each with its own length.

    Slot t of a row holds the token at position t of that sequence. Rows advance independently (`lengths`), so
    sequences of different lengths share one batch, and speculative decoding rolls a row back by lowering its
    length: slots past a length are never attended to and are overwritten by the next write.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        config: DeepseekV3Config,
        dtype: torch.dtype,
        device: torch.device | str,
        capacity: int = 256,
    ) -> None:
        self.c_kv = torch.zeros(
            num_layers, batch_size, capacity, config.kv_lora_rank, dtype=dtype, device=device
        )
        self.k_rope = torch.zeros(
            num_layers, batch_size, capacity, config.qk_rope_head_dim, dtype=dtype, device=device
        )
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.c_kv.shape[2]

    def reserve(self, needed: int) -> None:
        """Grow (doubling) so that slots [0, needed) exist."""
        if needed <= self.capacity:
            return
        grow = max(needed, 2 * self.capacity) - self.capacity
        self.c_kv = F.pad(self.c_kv, (0, 0, 0, grow))
        self.k_rope = F.pad(self.k_rope, (0, 0, 0, grow))

    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_rope.nbytes


@dataclass
class CacheStep:
    """What one layer needs to read/write the cache during a step: new tokens sit at `positions` [B, S] (slot ==
    position) and `key_mask` [B, S, 1, T] (True = attend) covers slots [0, T); a prefill through the training
    path only writes, so it needs no key_mask."""

    cache: LatentKVCache
    layer: int
    positions: torch.Tensor
    key_mask: torch.Tensor | None = None

    def write(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        rows = torch.arange(c_kv.shape[0], device=c_kv.device)[:, None]
        self.cache.c_kv[self.layer][rows, self.positions] = c_kv.to(self.cache.c_kv.dtype)
        self.cache.k_rope[self.layer][rows, self.positions] = k_rope.to(self.cache.k_rope.dtype)


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = (
            config.qk_nope_head_dim,
            config.qk_rope_head_dim,
            config.v_head_dim,
        )
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        q_out = self.num_heads * config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = make_linear(config, config.hidden_size, q_out)
        else:
            self.q_a_proj = make_linear(
                config, config.hidden_size, config.q_lora_rank, bias=config.attention_bias
            )
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = make_linear(config, config.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = make_linear(
            config, config.hidden_size, config.kv_lora_rank + self.rope_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = make_linear(
            config, config.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim)
        )
        self.o_proj = make_linear(
            config, self.num_heads * self.v_dim, config.hidden_size, bias=config.attention_bias
        )

    def _queries(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> q^C [B, L, H, d_h], RoPE(q^R) [B, L, H, d_h^R]  (Eq. 6-8)."""
        q = (
            self.q_proj(x)
            if self.config.q_lora_rank is None
            else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        )
        q = q.view(*x.shape[:2], self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin, self.config.rope_interleave)

    def _latents(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> c_KV [B, L, d_c] (normalised), RoPE(k^R) [B, L, d_h^R]  (Eq. 1 and 3): all a cache keeps."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin, self.config.rope_interleave)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | PackedSamples | None,
        cache: CacheStep | None = None,
    ) -> torch.Tensor:
        """Training/prefill path: per-head K/V (Eq. 2, 4, 5) and one attention call. `mask`: PackedSamples (varlen
        attention within each sample), a [B, 1, L, L] bool mask for SDPA, or None (plain causal). With `cache`,
        the step's latents are also written to it (prefill)."""
        batch, length, _ = x.shape
        q_nope, q_rope = self._queries(x, cos, sin)
        c_kv, k_rope = self._latents(x, cos, sin)
        if cache is not None:
            cache.write(c_kv, k_rope)
        kv = self.kv_b_proj(c_kv).view(batch, length, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, self.num_heads, -1)], dim=-1)
        if isinstance(mask, PackedSamples):
            # The YaRN-scaled softmax scale goes in explicitly: kernels default to 1/sqrt(d_h + d_h^R).
            q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # [B*L, H, d]: samples are row segments
            out = packed_attention(q, k, v, mask.cu_seqlens, mask.max_length, self.softmax_scale)
            return self.o_proj(out.reshape(batch, length, self.num_heads * self.v_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None and length > 1,
            scale=self.softmax_scale,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.v_dim))

    def forward_absorbed(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheStep
    ) -> torch.Tensor:
        """Decoding path: write this step's c_KV/k^R, then attend over the cached latents with W_UK absorbed into
        the query and W_UV applied to the attended latent (Sec. 2.1.1, "during inference")."""
        q_nope, q_rope = self._queries(x, cos, sin)
        c_new, k_rope_new = self._latents(x, cos, sin)
        cache.write(c_new, k_rope_new)
        extent = cache.key_mask.shape[-1]
        # Under autocast the einsums below compute in its dtype: read the latents (and W_UKV) in it directly.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        c_kv = cache.cache.c_kv[cache.layer, :, :extent].to(dtype)
        k_rope = cache.cache.k_rope[cache.layer, :, :extent].to(dtype)

        w_b = dense_weight(self.kv_b_proj).to(dtype).view(self.num_heads, self.nope_dim + self.v_dim, -1)
        w_uk, w_uv = w_b[:, : self.nope_dim], w_b[:, self.nope_dim :]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        scores = torch.einsum("bshc,btc->bsht", q_latent, c_kv) + torch.einsum(
            "bshr,btr->bsht", q_rope, k_rope
        )
        scores = (scores.float() * self.softmax_scale).masked_fill(~cache.key_mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(dtype)
        out_latent = torch.einsum("bsht,btc->bshc", probs, c_kv)
        out = torch.einsum("bshc,hdc->bshd", out_latent, w_uv)
        return self.o_proj(out.flatten(2))


def kv_cache_report(
    config: DeepseekV3Config, bytes_per_number: int = 2, gqa_groups: int = 8
) -> dict[str, float]:
    """KV-cache size per token of MLA vs multi-head and grouped-query attention with the same heads.

    Per token per layer (report Sec. 2.1.1 and DeepSeek-V2 Table 1): MHA keeps 2 n_h d_h numbers, GQA
    2 n_g d_h, MLA d_c + d_h^R. At V3 sizes: 2*128*128 = 32768 vs 512 + 64 = 576, i.e. 56.9x smaller.
    """
    layers = config.num_hidden_layers
    per_layer = {
        "mla": config.kv_lora_rank + config.qk_rope_head_dim,
        "mha": 2 * config.num_attention_heads * config.qk_nope_head_dim,
        "gqa": 2 * gqa_groups * config.qk_nope_head_dim,
    }
    report: dict[str, float] = {f"{k}_numbers_per_token_per_layer": v for k, v in per_layer.items()}
    report.update({f"{k}_bytes_per_token": v * layers * bytes_per_number for k, v in per_layer.items()})
    report["mha_over_mla"] = per_layer["mha"] / per_layer["mla"]
    report["gqa_over_mla"] = per_layer["gqa"] / per_layer["mla"]
    report["gqa_groups"] = gqa_groups
    return report
