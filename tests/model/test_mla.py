"""MLA: absorbed decoding over the latent cache equals the full-K/V training path; cache size formulas."""

import pytest
import torch
from tiny_deepseek import tiny_config

from posttrain.model import DeepseekV3Config, DeepseekV3ForCausalLM, kv_cache_report


@pytest.fixture
def model():
    return DeepseekV3ForCausalLM(tiny_config()).eval()


def test_absorbed_decoding_equals_full_forward_token_by_token(model):
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
    cache = model.new_cache(batch_size=2, capacity=4)  # grows while decoding
    for t in range(ids.shape[1]):
        logits, _ = model.decode_step(ids[:, t : t + 1], cache)
        assert (logits[:, 0] - full[:, t]).abs().max() <= 1e-4, t
    assert cache.lengths.tolist() == [20, 20]


def test_ragged_batch_prefill_then_decode(model):
    """Rows of different lengths share a batch: each continues at its own position."""
    short, long = torch.randint(0, 96, (1, 7)), torch.randint(0, 96, (1, 12))
    padded = torch.zeros(2, 12, dtype=torch.long)
    padded[0, :7], padded[1] = short[0], long[0]
    cache = model.new_cache(batch_size=2)
    logits, _ = model.decode_step(padded, cache, num_new=torch.tensor([7, 12]))
    with torch.no_grad():
        alone_short, alone_long = model(short).logits, model(long).logits
    assert (logits[0, :7] - alone_short[0]).abs().max() <= 1e-4
    assert (logits[1] - alone_long[0]).abs().max() <= 1e-4

    nxt = torch.randint(0, 96, (2, 1))
    logits, _ = model.decode_step(nxt, cache)
    with torch.no_grad():
        ref_short = model(torch.cat([short, nxt[:1]], dim=1)).logits[0, -1]
        ref_long = model(torch.cat([long, nxt[1:]], dim=1)).logits[0, -1]
    assert (logits[0, 0] - ref_short).abs().max() <= 1e-4
    assert (logits[1, 0] - ref_long).abs().max() <= 1e-4


def test_training_path_prefill_fills_the_same_cache(model):
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        full = model(torch.cat([ids, ids[:, :3]], dim=1)).logits
    logits, _ = model.decode_step(ids[:, :3], out.cache)
    assert (logits - full[:, 9:]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="use_cache"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]] * 2), use_cache=True)


def test_cache_keeps_576_numbers_per_token_per_layer_at_v3_sizes():
    v3 = DeepseekV3Config()  # V3 defaults: d_c = 512, d_h^R = 64, 128 heads of 128, 61 layers
    report = kv_cache_report(v3)
    assert report["mla_numbers_per_token_per_layer"] == 576
    assert report["mha_numbers_per_token_per_layer"] == 2 * 128 * 128
    assert round(report["mha_over_mla"]) == 57
    assert report["mla_bytes_per_token"] == 576 * 61 * 2
    assert report["gqa_numbers_per_token_per_layer"] == 2 * 8 * 128


def test_cache_tensor_bytes_match_the_formula(model):
    config = model.config
    cache = model.new_cache(batch_size=3, capacity=50)
    per_token_layer = (config.kv_lora_rank + config.qk_rope_head_dim) * 4  # float32
    assert cache.nbytes() == 3 * 50 * config.num_hidden_layers * per_token_layer
    assert kv_cache_report(config, bytes_per_number=4)["mla_bytes_per_token"] == (
        config.num_hidden_layers * per_token_layer
    )
