"""Rotary position embedding for MLA's decoupled key/query parts, with YaRN context extension.

Only the d_h^R = qk_rope_head_dim channels carry positions (report Eq. 3 and 7). DeepSeek checkpoints rotate
adjacent channel pairs (2j, 2j+1) (`rope_interleave=True`); `rope_interleave=False` rotates (j, j + d/2).
Either way q and k are rotated alike, so q.k is the same: we keep each layout in place.

YaRN (Peng et al. 2023) interpolates low frequencies by `factor`, keeps high ones, and ramps linearly in
between (beta_fast/beta_slow rotations over the original context); cos/sin are multiplied by
mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for V3) and the softmax scale by
mscale(factor, mscale_all_dim)^2 (see `DeepseekV3Config.softmax_scale`).
"""

from __future__ import annotations

import math

import torch

from posttrain.model.config import DeepseekV3Config, yarn_mscale


def rope_frequencies(
    config: DeepseekV3Config, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] (float32) and the cos/sin amplitude for `config`'s RoPE."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    if not config.is_yarn:
        return inv_freq, 1.0

    rope = config.rope_scaling
    factor = config.yarn_factor
    original = rope["original_max_position_embeddings"]
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def channel_of(rotations: float) -> float:
        # The pair index whose wavelength makes `rotations` turns over the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = channel_of(beta_fast), channel_of(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    amplitude = rope.get("attention_factor")
    if amplitude is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            amplitude = yarn_mscale(factor, rope["mscale"]) / yarn_mscale(factor, rope["mscale_all_dim"])
        else:
            amplitude = yarn_mscale(factor)
    return inv_freq, float(amplitude)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for given positions; holds no state, so a model built on the meta device needs none."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.interleaved = config.rope_interleave

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] -> (cos, sin), each [B, L, d/2] float32."""
        inv_freq, amplitude = rope_frequencies(self.config, position_ids.device)
        angles = position_ids.float()[..., None] * inv_freq
        return angles.cos() * amplitude, angles.sin() * amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, L, H, d] (or [B, L, d]) by cos/sin [B, L, d/2]; computed in float32, returned in x's dtype."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).type_as(x)
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)
