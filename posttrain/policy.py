"""Loading the model a recipe names, and the one forward the trainers use.

`Policy` wraps either posttrain's own DeepSeek-V3 (whose MTP modules live inside the model) or any
transformers causal LM (optionally with MTP modules attached, sharing its embedding and output head) behind a
single call: `policy(input_ids, position_ids, with_mtp) -> (logits, [mtp_logits per depth])`. Packed rows need
no attention mask: position ids that restart at 0 make both implementations attend within each sample only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from posttrain.config import ModelSection, uses_posttrain_model
from posttrain.model.gguf import resolve_model_path

log = logging.getLogger(__name__)


def load_tokenizer(cfg: ModelSection) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.tokenizer or cfg.path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(name: str) -> torch.dtype:
    # Master weights stay in float32 unless asked otherwise; bf16 compute comes from autocast.
    return {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def compute_dtype(cfg: ModelSection) -> torch.dtype | None:
    """The autocast dtype a model loaded by `load_causal_lm` computes in outside a trainer (a traces teacher):
    bf16 on a bf16-capable GPU when `dtype` is "auto" (fp32 weights, bf16 compute, as in the trainers), else None
    (the weights' own precision)."""
    if cfg.dtype == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _uses_posttrain_model(cfg: ModelSection, model_type: str) -> bool:
    if cfg.implementation == "posttrain" and model_type != "deepseek_v3":
        raise ValueError(f"model.implementation=posttrain supports deepseek_v3 models, not {model_type!r}")
    return uses_posttrain_model(cfg.implementation, model_type)


def load_causal_lm(cfg: ModelSection) -> nn.Module:
    """The bare causal LM: from a checkpoint (`path`) or randomly initialised from `from_config`."""
    dtype = _torch_dtype(cfg.dtype)
    path = resolve_model_path(cfg.path) if cfg.path else None  # a .gguf file: its converted checkpoint
    source = path or cfg.from_config
    config_dict = json.loads(Path(cfg.from_config).read_text()) if cfg.from_config else None
    model_type = config_dict["model_type"] if config_dict else AutoConfig.from_pretrained(source).model_type
    if _uses_posttrain_model(cfg, model_type):
        from posttrain.model import DeepseekV3Config, DeepseekV3ForCausalLM

        if config_dict is not None:
            model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(config_dict))
        else:
            model = DeepseekV3ForCausalLM.from_pretrained(path)
        model.set_attn_implementation(cfg.attn_implementation)  # "auto": varlen on CUDA, sdpa on CPU
        return model.to(dtype)
    attn = _attention_implementation(cfg.attn_implementation)
    if config_dict is not None:
        config = AutoConfig.for_model(**config_dict)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)


def _attention_implementation(name: str) -> str:
    """Packed rows need per-sample attention: varlen kernels on CUDA (measured fastest on the H100, see
    BENCHMARKS.md), transformers' SDPA with its packed-sequence mask on CPU."""
    if name == "auto":
        name = "varlen" if torch.cuda.is_available() else "sdpa"
    if name == "varlen":
        from posttrain.fast.attention import register_varlen_attention

        return register_varlen_attention()
    return name


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None  # DeepSeekMoE's optional sequence-wise balance loss
    hidden: torch.Tensor | None = (
        None  # final-norm output, with `hidden_only` (logits = hidden @ head_weightᵀ)
    )
    head_weight: torch.Tensor | None = None


class Policy(nn.Module):
    """A causal LM plus (optionally) attached MTP heads, as one module for accelerate/DDP/FSDP."""

    def __init__(self, model: nn.Module, mtp_heads: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.mtp_heads = mtp_heads

    @property
    def is_posttrain_model(self) -> bool:
        from posttrain.model import DeepseekV3ForCausalLM

        return isinstance(self.model, DeepseekV3ForCausalLM)

    @property
    def mtp_depth(self) -> int:
        if self.mtp_heads is not None:
            return self.mtp_heads.depth
        if self.is_posttrain_model:
            return len(self.model.model.mtp_layers)
        return 0

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        with_mtp: bool = False,
        logits_from: int = 0,
        hidden_only: bool = False,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> LMOutput:
        """Logits for positions `logits_from`.. of each row (all by default): scoring completions needs only
        their own positions. `hidden_only` returns the final hidden states and the head's weight instead, for
        losses that never build the [tokens, vocab] logits (posttrain.fast.chunked_loss). `attention_mask`: a
        boolean [B, 1, L, L] (True = may attend) for layouts that position ids cannot express; SDPA only.
        `cu_seqlens`: the packed samples' offsets as the data loader computed them (posttrain.data.packing.
        collate_packs), for varlen attention without a GPU→host sync; found from position_ids when None."""
        if self.is_posttrain_model:
            out = self.model(
                input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                return_mtp=with_mtp,
                return_logits=not hidden_only,
                cu_seqlens=cu_seqlens,
            )
            mtp_logits = list(out.mtp_logits or []) if with_mtp else []
            if hidden_only:
                return LMOutput(None, mtp_logits, out.aux_loss, out.hidden_states, self.model.lm_head.weight)
            return LMOutput(out.logits[:, logits_from:], mtp_logits, out.aux_loss)
        attention = self._attention_kwargs(position_ids, attention_mask, cu_seqlens)
        want_mtp = with_mtp and self.mtp_heads is not None
        if hidden_only:
            from posttrain.fast.backbone import hidden_states_and_head

            hidden, weight = hidden_states_and_head(self.model, input_ids, position_ids, **attention)
            mtp_logits = self.mtp_heads(hidden, input_ids, position_ids) if want_mtp else []
            return LMOutput(None, mtp_logits, hidden=hidden, head_weight=weight)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=want_mtp,
            logits_to_keep=input_ids.shape[1] - logits_from,
            **attention,
        )
        if not want_mtp:
            return LMOutput(out.logits)
        return LMOutput(out.logits, self.mtp_heads(out.hidden_states[-1], input_ids, position_ids))

    @property
    def attention_implementation(self) -> str | None:
        if self.is_posttrain_model:
            return self.model.attn_implementation
        return getattr(self.model.config, "_attn_implementation", None)

    @property
    def takes_dense_mask(self) -> bool:
        """Whether a boolean [B, 1, L, L] attention_mask can be passed: SDPA only (transformers' eager path adds
        the mask as a float bias; varlen and flash kernels take no dense mask)."""
        if self.is_posttrain_model:
            return self.attention_implementation != "varlen"
        return self.attention_implementation == "sdpa"

    def _attention_kwargs(
        self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None
    ) -> dict:
        from posttrain.fast.attention import VARLEN_ATTENTION, packed_attention_kwargs

        if attention_mask is not None:
            if not self.takes_dense_mask:
                raise ValueError(
                    f"a [B, 1, L, L] attention mask needs attn_implementation='sdpa', the model uses "
                    f"{self.attention_implementation!r} (model.attn_implementation in the recipe)"
                )
            return {"attention_mask": attention_mask}
        if self.attention_implementation == VARLEN_ATTENTION:
            return packed_attention_kwargs(position_ids, cu_seqlens)
        return {}

    def save_pretrained(self, directory: str | Path) -> None:
        """An HF-format model that transformers (or posttrain) loads; attached MTP heads saved beside it."""
        model = self.model
        if hasattr(model, "merge_and_unload"):  # LoRA: keep the adapter, and write the merged model
            model.save_pretrained(Path(directory) / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(directory)
        if self.mtp_heads is not None:
            self.mtp_heads.save_pretrained(directory)


def build_policy(cfg: ModelSection) -> Policy:
    model = load_causal_lm(cfg)
    heads = None
    if cfg.mtp.enabled and cfg.mtp.attach_depth > 0:
        from posttrain.model.mtp import attach_mtp

        heads = attach_mtp(model, depth=cfg.mtp.attach_depth)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()
    return Policy(model, heads)
