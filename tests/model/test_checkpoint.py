"""HF-format checkpoints: sharding, V3's MTP layout, key errors that name the keys, FP8 files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_deepseek import tiny_config

from posttrain.model import DeepseekV3ForCausalLM
from posttrain.model.fp8 import dequantize_weight, quantize_weight
from posttrain.model.fp8_linear import FP8Linear


def _all_file_tensors(path):
    tensors = {}
    for file in path.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


def test_sharded_round_trip_in_v3_layout(tmp_path):
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    model.model.layers[1].mlp.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path, max_shard_size="64KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and files == {p.name for p in tmp_path.glob("*.safetensors")}
    stored = _all_file_tensors(tmp_path)
    assert set(stored) == set(index["weight_map"])
    # MTP module 1 is decoder layer N = 3, with V3's extra tensors; experts are stored one by one.
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "embed_tokens", "shared_head.head"):
        assert f"model.layers.3.{name}.weight" in stored, name
    assert torch.equal(stored["model.layers.3.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert stored["model.layers.1.mlp.experts.7.up_proj.weight"].shape == (16, 32)
    assert torch.equal(
        stored["model.layers.1.mlp.experts.7.down_proj.weight"],
        model.model.layers[1].mlp.experts.down_proj[7],
    )

    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    expected_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert expected_state.keys() == loaded_state.keys()
    assert all(torch.equal(expected_state[k], loaded_state[k]) for k in expected_state)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(
            model(ids, return_mtp=True).mtp_logits[0], loaded(ids, return_mtp=True).mtp_logits[0]
        )


def test_missing_and_unexpected_keys_are_named(tmp_path):
    DeepseekV3ForCausalLM(tiny_config()).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.2.self_attn.kv_b_proj.weight"]
    del state["model.layers.1.mlp.experts.3.gate_proj.weight"]
    state["model.layers.2.self_attn.rotary.inv_freq"] = torch.ones(4)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(KeyError) as error:
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert (
        "missing keys [model.layers.1.mlp.experts.3.gate_proj.weight, model.layers.2.self_attn.kv_b_proj.weight]"
        in message
    )
    assert "unexpected keys [model.layers.2.self_attn.rotary.inv_freq]" in message


def test_tied_embeddings_are_written_once_and_stay_tied(tmp_path):
    model = DeepseekV3ForCausalLM(tiny_config(tie_word_embeddings=True, num_nextn_predict_layers=0))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_v3_fp8_checkpoint_loads_into_fp8_linears_and_dequantised_experts(tmp_path):
    """V3 ships projections and experts as e4m3 `weight` + `weight_scale_inv` per 128x128 block (16x16 here)."""
    DeepseekV3ForCausalLM(tiny_config()).save_pretrained(tmp_path)
    state, quantised = load_file(tmp_path / "model.safetensors"), {}
    for name, tensor in list(state.items()):
        if (
            name.endswith("_proj.weight")
            and ("self_attn" in name or ".mlp." in name)
            and "eh_proj" not in name
        ):
            state[name], state[name + "_scale_inv"] = quantize_weight(tensor, (16, 16))
            quantised[name] = dequantize_weight(state[name], state[name + "_scale_inv"], (16, 16))
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    attn = model.model.layers[2].self_attn
    assert isinstance(attn.kv_b_proj, FP8Linear) and isinstance(model.model.layers[0].mlp.up_proj, FP8Linear)
    assert torch.equal(attn.kv_b_proj.weight, quantised["model.layers.2.self_attn.kv_b_proj.weight"])
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.down_proj[4], quantised["model.layers.1.mlp.experts.4.down_proj.weight"])
    assert torch.equal(experts.gate_up_proj[4, 16:], quantised["model.layers.1.mlp.experts.4.up_proj.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 96, (1, 8))).logits).all()


def test_bf16_load_keeps_the_routing_bias_in_float32(tmp_path):
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    half = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    dtypes = {name: p.dtype for name, p in half.state_dict().items()}
    assert {d for n, d in dtypes.items() if not n.endswith("e_score_correction_bias")} == {torch.bfloat16}
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == torch.float32
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        full, low = model(ids).logits, half(ids).logits.float()
    assert (low - full).norm() / full.norm() < 3e-2
