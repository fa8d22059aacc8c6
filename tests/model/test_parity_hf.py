"""Logit parity with transformers' DeepseekV3ForCausalLM in both directions, through HF checkpoint files."""

import pytest
import torch
from tiny_deepseek import YARN, tiny_config
from transformers import DeepseekV3Config as HFConfig
from transformers import DeepseekV3ForCausalLM as HFModel

from posttrain.model import DeepseekV3ForCausalLM

VARIANTS = {
    "yarn_interleaved": {},
    "plain_rope_full_rank_q": {"rope_scaling": None, "rope_interleave": False, "q_lora_rank": None},
}


def _hf_kwargs(variant):
    config = tiny_config(**VARIANTS[variant]).to_dict()
    drop = ("extra", "architectures", "model_type", "bias_update_speed", "aux_loss_alpha", "seq_aux", "dtype")
    drop += (
        "scoring_func",
        "topk_method",
        "moe_layer_freq",
        "quantization_config",
        "num_nextn_predict_layers",
    )
    return {k: v for k, v in config.items() if k not in drop}


@torch.no_grad()
def _perturb(model):
    """Random norm gains and routing biases, so swapped norms or an ignored bias cannot pass unnoticed."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("norm.weight"):
            tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
        elif name.endswith("e_score_correction_bias"):
            tensor.copy_(0.05 * torch.randn_like(tensor))


def _inputs():
    return torch.randint(0, 96, (2, 24))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path, variant):
    hf = HFModel(HFConfig(**_hf_kwargs(variant))).eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()

    with pytest.raises(KeyError, match="init_missing_mtp"):  # transformers never writes MTP layers
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, init_missing_mtp=True).eval()
    ids = _inputs()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids, return_mtp=True)
    assert (got.logits - expected).abs().max() <= 1e-4
    assert got.mtp_logits[0].shape == (2, 23, 96) and torch.isfinite(got.mtp_logits[0]).all()

    # Packed rows: transformers detects the restart in position_ids as we do (only without a KV cache).
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)
    with torch.no_grad():
        expected = hf(ids, position_ids=position_ids, use_cache=False).logits
        got = ours(ids, position_ids=position_ids).logits
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, variant):
    ours = DeepseekV3ForCausalLM(tiny_config(**VARIANTS[variant])).eval()
    _perturb(ours)
    ours.save_pretrained(tmp_path)
    hf = HFModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters.get("rope_type", "default") == (
        "yarn" if variant == "yarn_interleaved" else "default"
    )
    ids = _inputs()
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_yarn_changes_the_logits():
    """Guard for the parity tests: YaRN's frequencies and softmax scale really enter the computation."""
    base = DeepseekV3ForCausalLM(tiny_config(rope_scaling=None)).eval()
    yarn = DeepseekV3ForCausalLM(tiny_config(rope_scaling=dict(YARN, factor=8.0))).eval()
    yarn.load_state_dict(base.state_dict())
    ids = _inputs()
    with torch.no_grad():
        assert (base(ids).logits - yarn(ids).logits).abs().max() > 1e-3
