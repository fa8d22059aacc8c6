"""Sample masking in packs: every sample in a pack gets exactly the logits and loss it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.algorithms.sft import shifted_targets, token_cross_entropy_sum
from posttrain.data.packing import PackedDataset, TokenizedSamples, plan_packs
from posttrain.policy import Policy

LENGTHS = [37, 5, 61, 1, 20]


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def samples() -> TokenizedSamples:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, size=sum(LENGTHS)).astype(np.int64)
    mask = rng.random(sum(LENGTHS)) < 0.7
    offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
    return TokenizedSamples(input_ids=ids, loss_mask=mask, offsets=offsets)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_packed_logits_and_loss_equal_each_sample_alone(model_type):
    policy = Policy(tiny(model_type))
    data = samples()
    plan = plan_packs(data.lengths, capacity=128)
    assert plan.n_bins == 1
    pack = PackedDataset(data, plan, pad_id=0)[0]
    ids, pos, mask = (pack[k].unsqueeze(0) for k in ("input_ids", "position_ids", "loss_mask"))
    with torch.no_grad():
        packed_logits = policy(ids, pos).logits[0]
    packed_targets = shifted_targets(ids, mask, pos)[0]

    cursor = 0
    for sample_index in plan.bin(0):
        start, end = data.offsets[sample_index], data.offsets[sample_index + 1]
        alone_ids = torch.as_tensor(data.input_ids[start:end]).unsqueeze(0)
        alone_mask = torch.as_tensor(data.loss_mask[start:end]).unsqueeze(0)
        alone_pos = torch.arange(end - start).unsqueeze(0)
        with torch.no_grad():
            alone_logits = policy(alone_ids, alone_pos).logits[0]
        n = end - start
        assert torch.equal(ids[0, cursor : cursor + n], alone_ids[0])
        torch.testing.assert_close(packed_logits[cursor : cursor + n], alone_logits, atol=1e-5, rtol=1e-5)
        alone_targets = shifted_targets(alone_ids, alone_mask, alone_pos)[0]
        assert torch.equal(packed_targets[cursor : cursor + n], alone_targets)
        packed_loss, _ = token_cross_entropy_sum(
            packed_logits[cursor : cursor + n], packed_targets[cursor : cursor + n]
        )
        alone_loss, _ = token_cross_entropy_sum(alone_logits, alone_targets)
        torch.testing.assert_close(packed_loss, alone_loss, atol=1e-4, rtol=1e-5)
        cursor += n


def test_without_restarting_positions_samples_would_leak():
    """The control: the same pack with one running position sequence differs (so the test above can fail)."""
    policy = Policy(tiny("qwen2"))
    data = samples()
    pack = PackedDataset(data, plan_packs(data.lengths, capacity=128), pad_id=0)[0]
    ids, pos = pack["input_ids"].unsqueeze(0), pack["position_ids"].unsqueeze(0)
    with torch.no_grad():
        masked = policy(ids, pos).logits
        leaking = policy(ids, torch.arange(ids.shape[1]).unsqueeze(0)).logits
    first = int(data.lengths[plan_packs(data.lengths, capacity=128).bin(0)[0]])
    assert not torch.allclose(masked[0, first:], leaking[0, first:], atol=1e-3)
