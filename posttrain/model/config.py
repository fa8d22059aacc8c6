"""DeepSeek-V3 configuration, read from a checkpoint's `config.json` as is.

Field names are those of transformers' `DeepseekV3Config` and of the released DeepSeek-V3 `config.json`, so
the same file drives posttrain, transformers and vLLM. Keys we do not use (`auto_map`, `ep_size`,
`transformers_version`, ...) are kept in `extra` and written back unchanged.

Two fields are ours (training knobs the released config does not carry):
- `bias_update_speed`: gamma of the auxiliary-loss-free balancing, b_i -= gamma * sign(load_i - mean load)
  (report Sec. 2.1.2); 0 disables it.
- `aux_loss_alpha` / `seq_aux` exist in the released config: alpha of the sequence-wise balance loss
  (report Eq. 17-20), computed only while training and only when alpha > 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Written by transformers next to the real fields; derived from other fields, so never read back.
_DERIVED_KEYS = ("head_dim", "qk_head_dim", "model_type")
# transformers 5 spells these differently from the released checkpoint.
_ALIASES = {"num_mtp_layers": "num_nextn_predict_layers", "torch_dtype": "dtype"}


@dataclass
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    # MLA (report Eq. 1-11): q_lora_rank None means a full-rank query projection (V2-Lite style).
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE (report Eq. 12-16)
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    bias_update_speed: float = 0.001
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    # MTP (report Eq. 21-25)
    num_nextn_predict_layers: int = 1
    # Positions: rope_scaling is None or a YaRN dict {type, factor, original_max_position_embeddings,
    # beta_fast, beta_slow, mscale, mscale_all_dim}.
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # FP8 checkpoints: {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}
    quantization_config: dict[str, Any] | None = None
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_yarn(self) -> bool:
        return self.rope_scaling is not None and _rope_type(self.rope_scaling) == "yarn"

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale(factor, mscale_all_dim)^2 under YaRN (as DeepSeek and transformers)."""
        scale = self.qk_head_dim**-0.5
        if self.is_yarn and self.rope_scaling.get("mscale_all_dim"):
            m = yarn_mscale(self.yarn_factor, self.rope_scaling["mscale_all_dim"])
            scale *= m * m
        return scale

    @property
    def yarn_factor(self) -> float:
        factor = self.rope_scaling.get("factor")
        if factor is None:
            factor = self.max_position_embeddings / self.rope_scaling["original_max_position_embeddings"]
        return float(factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (MTP layers continue the numbering) uses DeepSeekMoE instead of a dense MLP."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"DeepseekV3Config.{name}={getattr(self, name)!r}: {why}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "vocab_size"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.scoring_func != "sigmoid":
            raise bad("scoring_func", "only DeepSeek-V3's 'sigmoid' affinities are supported")
        if self.topk_method != "noaux_tc":
            raise bad(
                "topk_method", "only DeepSeek-V3's 'noaux_tc' (bias-corrected group top-k) is supported"
            )
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only 'silu' (SwiGLU experts) is supported")
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"must be in [1, n_group={self.n_group}]")
            reachable = self.topk_group * self.n_routed_experts // self.n_group
            if not 1 <= self.num_experts_per_tok <= reachable:
                raise bad(
                    "num_experts_per_tok", f"must be in [1, {reachable}] (experts in topk_group groups)"
                )
        if self.rope_scaling is not None:
            kind = _rope_type(self.rope_scaling)
            if kind not in ("yarn", "default"):
                raise bad("rope_scaling", f"type {kind!r} unsupported (yarn or default)")
            if kind == "yarn" and "original_max_position_embeddings" not in self.rope_scaling:
                raise bad("rope_scaling", "YaRN needs original_max_position_embeddings")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", "must be >= 0")

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> DeepseekV3Config:
        data = {_ALIASES.get(k, k): v for k, v in {**data, **overrides}.items()}
        if data.get("model_type", "deepseek_v3") != "deepseek_v3":
            raise ValueError(f"config model_type={data['model_type']!r}: expected 'deepseek_v3'")
        if "rope_parameters" in data:  # transformers 5 folds rope_theta into rope_parameters
            rope = dict(data.pop("rope_parameters") or {})
            data.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
            if _rope_type(rope) != "default":
                data.setdefault("rope_scaling", rope)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k not in _DERIVED_KEYS}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The released checkpoint's layout (rope_theta + rope_scaling), readable by transformers and vLLM."""
        out = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], **self.extra}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        if out["dtype"] is None:
            del out["dtype"]
        if out["quantization_config"] is None:
            del out["quantization_config"]
        return out

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides: Any) -> DeepseekV3Config:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read config {path}: {err}") from err
        return cls.from_dict(data, **overrides)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> DeepseekV3Config:
        return cls.from_json_file(Path(path) / "config.json", **overrides)

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _rope_type(rope: dict[str, Any]) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1 (YaRN paper, Eq. 22)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
