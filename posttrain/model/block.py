"""One DeepSeek-V3 Transformer block: pre-norm MLA, then pre-norm dense MLP (first `first_k_dense_replace`
layers) or DeepSeekMoE. Names match transformers' DeepseekV3DecoderLayer so checkpoints map one to one."""

from __future__ import annotations

import torch
from torch import nn

from posttrain.model.config import DeepseekV3Config
from posttrain.model.layers import MLP, RMSNorm
from posttrain.model.mla import CacheStep, MultiHeadLatentAttention
from posttrain.model.moe import DeepSeekMoE


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MultiHeadLatentAttention(config)
        self.mlp = (
            DeepSeekMoE(config) if config.is_moe_layer(layer_idx) else MLP(config, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        cache: CacheStep | None = None,
        absorbed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [B, L, D] -> (h, MoE balance loss or None). `absorbed` attends over `cache` in latent space
        (decoding); otherwise full K/V attention under `mask`, writing latents to `cache` if given (prefill)."""
        x = self.input_layernorm(h)
        if absorbed:
            h = h + self.self_attn.forward_absorbed(x, *rope, cache)
        else:
            h = h + self.self_attn(x, *rope, mask, cache)
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, DeepSeekMoE):
            out, aux_loss = self.mlp(x, sample_ids)
            return h + out, aux_loss
        return h + self.mlp(x), None
