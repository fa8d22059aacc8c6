"""DeepseekV3ForCausalLM: embedding -> N blocks (MLA + dense MLP / DeepSeekMoE) -> norm -> head, plus the MTP
modules. Parameter names are transformers' (`model.layers.3.self_attn.kv_b_proj.weight`, ...); checkpoint.py
maps the few that differ in files (stacked experts, MTP layers) and reads/writes HF safetensors shards.

Training: `model(input_ids, position_ids, return_mtp=True)`; rows may hold packed samples, delimited by
restarting position_ids (block-diagonal causal attention). `attn_implementation` picks how the blocks attend:
"varlen" (per-sample kernels over cumulative sequence lengths, no [L, L] mask: FlashAttention's varlen kernel
on CUDA, one SDPA call over the samples as a padded batch elsewhere), "sdpa" (one SDPA call under a dense
block-diagonal mask) or "auto" (varlen, on every device: per-sample attention is also the faster one on CPU).

Decoding: `decode_step` with a `LatentKVCache` (absorbed MLA); decoding.py builds greedy and MTP speculative
generation on it (`generate_greedy(model, ...)`, `generate_speculative(model, ...)`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from posttrain.fast.attention import PackedSamples
from posttrain.model.block import DecoderLayer
from posttrain.model.config import DeepseekV3Config
from posttrain.model.layers import RMSNorm, packed_causal_mask, sample_ids
from posttrain.model.mla import CacheStep, LatentKVCache
from posttrain.model.moe import DeepSeekMoE, MoEGate, RoutedExperts, recomputing, update_expert_bias
from posttrain.model.mtp import MTPLayer
from posttrain.model.rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    """logits [B, L, V] (None with return_logits=False); mtp_logits[k-1] [B, L-k, V] (position i predicts token i+1+k) when asked for;
    hidden_states [B, L, D] after the final norm; aux_loss: summed sequence-wise balance loss of all MoE layers
    (None unless training with aux_loss_alpha > 0); cache: the prefilled LatentKVCache when use_cache."""

    logits: torch.Tensor | None
    mtp_logits: list[torch.Tensor] | None = None
    hidden_states: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    cache: LatentKVCache | None = None


class DeepseekV3Model(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        first = config.num_hidden_layers
        self.mtp_layers = nn.ModuleList(
            MTPLayer(config, first + k) for k in range(config.num_nextn_predict_layers)
        )


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "varlen")


def _checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Plain first forward; the recomputation in backward must not count expert loads again."""
    return contextlib.nullcontext(), recomputing()


def _add(total: torch.Tensor | None, term: torch.Tensor | None) -> torch.Tensor | None:
    return term if total is None else total if term is None else total + term


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(
        self, config: DeepseekV3Config, init_weights: bool = True, attn_implementation: str = "auto"
    ) -> None:
        super().__init__()
        self.config = config
        self.set_attn_implementation(attn_implementation)
        self.model = DeepseekV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        if init_weights:
            self.init_weights()

    def get_output_embeddings(self) -> nn.Linear:
        """The output head, under transformers' name for it."""
        return self.lm_head

    def set_attn_implementation(self, name: str) -> None:
        """One of "auto" (varlen on CUDA, sdpa elsewhere), "varlen", "sdpa"; see the module docstring."""
        if name not in ATTN_IMPLEMENTATIONS:
            choices = ", ".join(ATTN_IMPLEMENTATIONS)
            raise ValueError(f"attn_implementation={name!r}: posttrain's DeepSeek-V3 supports {choices}")
        self.attn_implementation = name

    def attention_layout(
        self,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | PackedSamples | None:
        """How the blocks attend over rows with these positions: PackedSamples for varlen attention, else a dense
        [B, 1, L, L] mask or None (plain causal) for SDPA. A padding mask with zeros always takes the dense path;
        a prepared [B, 1, L, L] mask is used as given, with SDPA. `cu_seqlens`: the samples' offsets as the data
        loader computed them (varlen only), which spares the GPU→host sync of finding them."""
        if attention_mask is not None and attention_mask.dim() == 4:
            if self.attn_implementation == "varlen":
                raise ValueError(
                    "a [B, 1, L, L] attention_mask needs SDPA: attn_implementation='varlen' takes no dense mask"
                )
            return attention_mask
        varlen = self.attn_implementation in ("varlen", "auto")  # the faster on CPU too (fast/attention.py)
        if varlen and (attention_mask is None or bool(attention_mask.all())):
            return PackedSamples.of_rows(position_ids, cu_seqlens)
        return packed_causal_mask(position_ids, attention_mask)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block's activations in the backward pass (training forwards only)."""
        self.gradient_checkpointing = True

    def _block(self, layer: nn.Module, *args: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False, context_fn=_checkpoint_contexts)
        return layer(*args)

    @torch.no_grad()
    def init_weights(self, root: nn.Module | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for biases (transformers' init),
        for the whole model or only the modules under `root`."""
        std = self.config.initializer_range
        for module in (self if root is None else root).modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, MoEGate):
                module.weight.normal_(0.0, std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RoutedExperts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, nn.Embedding) or (
                hasattr(module, "in_features") and module.weight.element_size() > 1
            ):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if getattr(module, "padding_idx", None) is not None:
                    module.weight[module.padding_idx].zero_()
            if isinstance(module, DeepSeekMoE):
                module.expert_load.zero_()

    # ------------------------------------------------------------------ training / scoring
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
        return_mtp: bool = False,
        return_logits: bool = True,
        cu_seqlens: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, L]. position_ids [B, L] may restart inside a row (packed samples: each token attends only
        to earlier tokens of its own sample). attention_mask is optional: [B, L] (1 = token, 0 = padding), or a
        prepared boolean [B, 1, L, L] (True = may attend) for layouts positions cannot express (completions
        sharing one prompt), attended with SDPA.
        use_cache returns the prompt's latent cache for `decode_step` (one unpadded sample per row). Attention
        follows `attn_implementation` (see `attention_layout`). return_logits=False skips the output head (a
        loss fused with the head reads `hidden_states`). cu_seqlens: int32 [n + 1], the packed samples' offsets over
        the flattened rows as the data loader computed them (posttrain.data.packing.collate_packs); without it,
        varlen attention finds them from position_ids on the device."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        prepared_mask = attention_mask is not None and attention_mask.dim() == 4
        for name, extra, shape in (
            ("position_ids", position_ids, input_ids.shape),
            (
                "attention_mask",
                attention_mask,
                (batch, 1, length, length) if prepared_mask else input_ids.shape,
            ),
        ):
            if extra is not None and extra.shape != shape:
                raise ValueError(f"{name} has shape {tuple(extra.shape)}, expected {tuple(shape)}")
        if prepared_mask and return_mtp:
            raise ValueError("return_mtp takes a [B, L] padding mask, not a prepared [B, 1, L, L] one")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, -1)
        ids = sample_ids(position_ids)
        if use_cache and (attention_mask is not None or bool((ids[:, -1] > 0).any())):
            raise ValueError("use_cache needs one unpadded sample per row (no attention_mask, no packing)")
        mask = self.attention_layout(position_ids, attention_mask, cu_seqlens)
        rope = self.model.rotary_emb(position_ids)
        cache = self.new_cache(batch, capacity=length) if use_cache else None

        h = self.model.embed_tokens(input_ids)
        aux_loss = None
        for i, layer in enumerate(self.model.layers):
            step = CacheStep(cache, i, position_ids) if cache is not None else None
            h, aux = self._block(layer, h, rope, mask, ids, step)
            aux_loss = _add(aux_loss, aux)
        if cache is not None:
            cache.lengths += length
        h = self.model.norm(h)
        out = CausalLMOutput(logits=self.lm_head(h) if return_logits else None, hidden_states=h, cache=cache)
        if return_mtp and len(self.model.mtp_layers):
            out.mtp_logits, mtp_aux = self._mtp_forward(h, input_ids, position_ids, attention_mask)
            aux_loss = _add(aux_loss, mtp_aux)
        out.aux_loss = aux_loss
        return out

    def _mtp_forward(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Eq. 21-23 over the whole row: module k sees positions i < L-k, pairing h^{k-1}_i with Emb(t_{i+k}),
        at the positions (and so with the sample boundaries) of h_i."""
        length = input_ids.shape[1]
        logits, aux_loss, h_prev = [], None, h
        for k, layer in enumerate(self.model.mtp_layers, start=1):
            n = length - k
            if n <= 0:
                break
            pos = position_ids[:, :n]
            pad = attention_mask[:, :n] if attention_mask is not None else None
            x = layer.combine(h_prev[:, :n], self.model.embed_tokens(input_ids[:, k:]))
            x, aux = self._block(
                layer, x, self.model.rotary_emb(pos), self.attention_layout(pos, pad), sample_ids(pos)
            )
            logits.append(self.lm_head(layer.shared_head.norm(x)))
            aux_loss, h_prev = _add(aux_loss, aux), x
        return logits, aux_loss

    # ------------------------------------------------------------------ decoding
    def new_cache(
        self, batch_size: int, capacity: int = 256, mtp: bool = False, dtype: torch.dtype | None = None
    ) -> LatentKVCache:
        """An empty latent cache for the main layers (or, with mtp=True, for the MTP layers), in `dtype` (default:
        the weights'; a decoder under bf16 autocast keeps its latents in bf16)."""
        param = self.lm_head.weight
        layers = len(self.model.mtp_layers) if mtp else self.config.num_hidden_layers
        return LatentKVCache(layers, batch_size, self.config, dtype or param.dtype, param.device, capacity)

    def _cached_steps(self, cache: LatentKVCache, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, S] of `steps` new tokens per row and the key mask [B, S, 1, T] over the cache."""
        positions = cache.lengths[:, None] + torch.arange(steps, device=cache.lengths.device)
        extent = int(positions.max()) + 1
        cache.reserve(extent)
        key_mask = torch.arange(extent, device=positions.device) <= positions[:, :, None, None]
        return positions, key_mask

    @torch.no_grad()
    def decode_step(
        self, input_ids: torch.Tensor, cache: LatentKVCache, num_new: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append input_ids [B, S] to each row of `cache` (row b continues at position cache.lengths[b]) and return
        (logits [B, S, V], final hidden states [B, S, D]). Rows then advance by `num_new` [B] (default S): a row
        given fewer real tokens (right padding) or rolling back a rejected draft advances less; slots past its
        length are ignored and later overwritten."""
        steps = input_ids.shape[1]
        positions, key_mask = self._cached_steps(cache, steps)
        rope = self.model.rotary_emb(positions)
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h, _ = layer(h, rope, cache=CacheStep(cache, i, positions, key_mask), absorbed=True)
        cache.lengths += steps if num_new is None else num_new
        h = self.model.norm(h)
        return self.lm_head(h), h

    @torch.no_grad()
    def mtp_decode_step(
        self,
        h_prev: torch.Tensor,
        next_ids: torch.Tensor,
        cache: LatentKVCache,
        num_new: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First MTP module, cached: pairs (h_i, t_{i+1}) -> logits for t_{i+2} (the draft). h_prev [B, S, D] are
        main hidden states, next_ids [B, S] the tokens one step ahead; slot i of `cache` is MTP position i."""
        layer = self.model.mtp_layers[0]
        positions, key_mask = self._cached_steps(cache, next_ids.shape[1])
        x = layer.combine(h_prev, self.model.embed_tokens(next_ids))
        x, _ = layer(
            x, self.model.rotary_emb(positions), cache=CacheStep(cache, 0, positions, key_mask), absorbed=True
        )
        cache.lengths += next_ids.shape[1] if num_new is None else num_new
        return self.lm_head(layer.shared_head.norm(x)), x

    # ------------------------------------------------------------------ balancing
    def update_routing_bias(
        self, gamma: float | None = None, process_group: torch.distributed.ProcessGroup | None = None
    ) -> dict[str, float]:
        """Auxiliary-loss-free bias step for every MoE layer; see `moe.update_expert_bias`."""
        return update_expert_bias(self, gamma, process_group)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        init_missing_mtp: bool = False,
        **config_overrides: object,
    ) -> DeepseekV3ForCausalLM:
        """Load an HF-format checkpoint directory (config.json + model.safetensors or sharded + index).
        Missing or unexpected weights raise KeyError naming them. A checkpoint without MTP layers (transformers
        never saves them) loads with init_missing_mtp=True (fresh MTP modules) or num_nextn_predict_layers=0."""
        from posttrain.model.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype, device, init_missing_mtp, **config_overrides)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors shards (+ model.safetensors.index.json) under HF/V3 names."""
        from posttrain.model.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size)
