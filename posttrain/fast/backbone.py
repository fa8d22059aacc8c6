"""The pieces of a transformers causal LM that the fast paths need: hidden states instead of logits, the output
head's weight, and `torch.compile` of the decoder layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model


def _backbone(lm: nn.Module) -> nn.Module:
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "") or "model", None)
    if backbone is None:
        raise ValueError(
            f"{type(lm).__name__} is not a transformers causal LM with a `base_model_prefix` backbone"
        )
    return backbone


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama/Qwen2-style transformers model (or raise naming what was found)."""
    layers = getattr(_backbone(_causal_lm(model)), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `<backbone>.layers` ModuleList of decoder blocks")
    return layers


def hidden_states_and_head(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm's output [B, S, d] and the output head's weight [V, d], so that logits = hidden @ Wᵀ.

    For models whose logits are exactly that product (no bias, no logit scaling or soft-capping); others raise.
    """
    lm = _causal_lm(model)
    backbone = _backbone(lm)
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config()
    scaled = [
        name
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
        if getattr(config, name, None)
    ]
    if getattr(head, "bias", None) is not None or scaled:
        raise ValueError(
            f"{type(lm).__name__}: logits are not hidden @ lm_head.weight.T ({scaled or 'bias'})"
        )
    out = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
    return out.last_hidden_state, head.weight


def _mark_tokens_dynamic(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Before a compiled block runs: its token dimension (and the per-sample offsets of packed rows) may take any
    size, so a pack of a new length reuses the graph instead of recompiling. Every dim of size S of the hidden
    states [B, S, d] and of the other tensor arguments (position ids, RoPE's cos/sin, a [B, 1, S, S] mask) is
    marked, and dim 0 of 1-D integer tensors (cu_seqlens: one entry per sample + 1). The bound on the sample
    length that varlen attention takes as a Python int is the row length S (posttrain.fast.attention), so it
    changes only when S does, and is symbolic after that first change."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        return
    seq = hidden.shape[1]
    tensors = [*args, *kwargs.values()]
    tensors += [t for value in kwargs.values() if isinstance(value, tuple) for t in value]
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.ndim >= 2:
            for dim, size in enumerate(tensor.shape):
                if size == seq:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        elif tensor.ndim == 1 and tensor.dtype in (torch.int32, torch.int64):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def compile_decoder_layers(model: nn.Module, **compile_kwargs: Any) -> int:
    """`torch.compile` each decoder block's forward in place (one graph reused by every layer, whatever the pack
    length: see `_mark_tokens_dynamic`, which runs eagerly before each compiled forward); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.register_forward_pre_hook(_mark_tokens_dynamic, with_kwargs=True)
        layer.forward = torch.compile(layer.forward, **compile_kwargs)
    return len(layers)
