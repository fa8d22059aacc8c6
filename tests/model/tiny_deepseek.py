"""Tiny DeepSeek-V3 configs shared by the model tests (CPU, float32, random weights)."""

from posttrain.model import DeepseekV3Config

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def tiny_config(**overrides) -> DeepseekV3Config:
    fields = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=12,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
        max_position_embeddings=128,
        rope_scaling=dict(YARN),
        # Large enough that attention is far from uniform, so positions and scales matter to the logits.
        initializer_range=0.2,
    )
    fields.update(overrides)
    return DeepseekV3Config(**fields)
