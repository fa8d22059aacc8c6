"""DeepSeek-V3 modules (MLA, DeepSeekMoE, MTP) that load and save HF-format checkpoints."""

from posttrain.model.config import DeepseekV3Config
from posttrain.model.decoding import generate_greedy, generate_speculative
from posttrain.model.mla import LatentKVCache, kv_cache_report
from posttrain.model.modeling import CausalLMOutput, DeepseekV3ForCausalLM
from posttrain.model.moe import update_expert_bias
from posttrain.model.mtp import AttachedMTP, attach_mtp, mtp_loss

__all__ = [
    "AttachedMTP",
    "CausalLMOutput",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "LatentKVCache",
    "attach_mtp",
    "generate_greedy",
    "generate_speculative",
    "kv_cache_report",
    "mtp_loss",
    "update_expert_bias",
]
