"""DeepseekV3Config reads real config.json files as they are and writes them back."""

import json

import pytest
from transformers import DeepseekV3Config as HFConfig

from posttrain.model import DeepseekV3Config

# The released DeepSeek-V3 config.json (auto_map trimmed), field for field.
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_released_v3_config_round_trips(tmp_path):
    config = DeepseekV3Config.from_dict(V3_CONFIG)
    assert config.n_group == 8 and config.topk_group == 4 and config.num_nextn_predict_layers == 1
    assert config.is_yarn and config.yarn_factor == 40
    assert config.quantization_config["weight_block_size"] == [128, 128]
    assert config.dtype == "bfloat16" and config.aux_loss_alpha == 0.001
    assert [config.is_moe_layer(i) for i in (0, 2, 3, 60, 61)] == [False, False, True, True, True]
    # YaRN's mscale enters the softmax scale squared: (0.1 ln 40 + 1)^2 / sqrt(192).
    assert config.softmax_scale == pytest.approx((0.1 * 3.6888794541139363 + 1) ** 2 / 192**0.5)

    written = config.to_dict()
    for key, value in V3_CONFIG.items():
        assert written[{"torch_dtype": "dtype"}.get(key, key)] == value, key
    config.save_pretrained(tmp_path)
    assert DeepseekV3Config.from_pretrained(tmp_path) == config


def test_transformers_reads_what_we_write_and_we_read_what_it_writes(tmp_path):
    DeepseekV3Config.from_dict(V3_CONFIG).save_pretrained(tmp_path / "ours")
    theirs = HFConfig.from_pretrained(tmp_path / "ours")
    assert theirs.rope_parameters["rope_type"] == "yarn" and theirs.rope_parameters["factor"] == 40
    assert theirs.num_mtp_layers == 1 and theirs.n_group == 8

    theirs.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_parameters" in written  # transformers 5's layout
    back = DeepseekV3Config.from_pretrained(tmp_path / "hf")
    assert back.rope_theta == 10000 and back.rope_scaling["factor"] == 40
    assert back.softmax_scale == DeepseekV3Config.from_dict(V3_CONFIG).softmax_scale


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_group", 7, "n_group=7"),
        ("scoring_func", "softmax", "scoring_func='softmax'"),
        ("topk_group", 9, "topk_group=9"),
        ("qk_rope_head_dim", 63, "qk_rope_head_dim=63"),
        ("model_type", "llama", "model_type='llama'"),
    ],
)
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        DeepseekV3Config.from_dict({**V3_CONFIG, field: value})
