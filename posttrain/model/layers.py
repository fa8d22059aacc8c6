"""Small building blocks shared by MLA, DeepSeekMoE and MTP: RMSNorm, the SwiGLU MLP, the linear-layer hook
that FP8 plugs into, and the packed-sample causal mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.model.config import DeepseekV3Config


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (names match transformers: `weight`)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def make_linear(
    config: DeepseekV3Config, in_features: int, out_features: int, bias: bool = False
) -> nn.Module:
    """THE linear-layer hook: every projection of MLA, the dense MLP, the shared experts and the MTP blocks is built
    here. A block-wise FP8 checkpoint (`quantization_config = {"quant_method": "fp8", "weight_block_size":
    [128, 128], ...}`) gets `posttrain.model.fp8_linear.FP8Linear`, whose state dict (`weight` in e4m3 plus
    `weight_scale_inv`) matches the checkpoint; otherwise a plain `nn.Linear`. The router, embeddings, norms and
    output head stay in high precision, as in the report (Sec. 3.3.1)."""
    quant = config.quantization_config
    if quant and quant.get("quant_method") == "fp8":
        from posttrain.model.fp8_linear import FP8Linear  # imported only for FP8 checkpoints

        block = tuple(quant.get("weight_block_size") or (128, 128))
        return FP8Linear(in_features, out_features, bias=bias, block_size=block)
    return nn.Linear(in_features, out_features, bias=bias)


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A linear layer's weight [out, in] in a floating dtype, dequantised when stored in FP8 (`weight` e4m3 plus
    `weight_scale_inv`); MLA's weight absorption needs the matrix itself, not just its product with x."""
    if linear.weight.element_size() > 1:
        return linear.weight
    from posttrain.model.fp8 import dequantize_weight

    return dequantize_weight(linear.weight, linear.weight_scale_inv, linear.block_size)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, config: DeepseekV3Config, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = make_linear(config, config.hidden_size, intermediate_size)
        self.up_proj = make_linear(config, config.hidden_size, intermediate_size)
        self.down_proj = make_linear(config, intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def sample_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which packed sample each token belongs to: a new one starts wherever position_ids[i] != position_ids[i-1] + 1
    (the rule of transformers' `find_packed_sequence_indices`). [B, L] -> [B, L], 0-based per row."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def packed_causal_mask(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Boolean mask [B, 1, L, L] (True = may attend): causal, within one packed sample, never to a padding key.

    None when plain causal attention is right (one sample per row, no padding), so SDPA can use `is_causal`.
    A query always sees itself, so a padding query never has an empty row (no NaN); its output is ignored.
    """
    packed = position_ids is not None and bool((sample_ids(position_ids)[:, -1] > 0).any())
    if not packed and attention_mask is None:
        return None
    ref = position_ids if position_ids is not None else attention_mask
    length = ref.shape[-1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=ref.device).tril()[None]
    if packed:
        ids = sample_ids(position_ids)
        allowed = allowed & (ids[:, :, None] == ids[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=ref.device)
    return allowed[:, None]
