"""Packed-sample attention, the hidden-state forward and compiled blocks give the plain path's numbers on a tiny
Qwen2 (fp32): logits, the SFT loss and every parameter's gradient, and GRPO's completion log-probs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.algorithms.sft import shifted_targets, token_cross_entropy_sum
from posttrain.data.packing import PackedDataset, PackPlan, TokenizedSamples, collate_packs
from posttrain.fast.attention import (
    VARLEN_ATTENTION,
    cu_seqlens_from_position_ids,
    packed_attention_kwargs,
    register_varlen_attention,
)
from posttrain.fast.backbone import compile_decoder_layers, hidden_states_and_head
from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum, chunked_token_logprobs
from posttrain.policy import Policy
from posttrain.trainers.grpo_layouts import completion_logprobs

SAMPLE_LENGTHS = [[13, 30, 1, 20], [64]]  # two packed rows of 64 tokens; a one-token sample included


@pytest.fixture(scope="module")
def models(tiny_qwen2_config_path):
    register_varlen_attention()
    config = AutoConfig.for_model(**json.loads(open(tiny_qwen2_config_path).read()))
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    fast = AutoModelForCausalLM.from_config(config, attn_implementation=VARLEN_ATTENTION, dtype=torch.float32)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _packed_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in SAMPLE_LENGTHS])
    input_ids = torch.randint(3, vocab, positions.shape, generator=g)
    loss_mask = (positions > 0) & (torch.rand(positions.shape, generator=g) < 0.8)
    return {"input_ids": input_ids, "position_ids": positions, "loss_mask": loss_mask}


def test_cu_seqlens_from_position_ids_by_hand():
    positions = torch.tensor([[0, 1, 2, 0, 1, 5], [6, 7, 0, 1, 2, 3]])
    cu_seqlens, longest = cu_seqlens_from_position_ids(positions)
    # A jump (1 -> 5) starts a sample as a restart does; every row starts one, even if its positions continue.
    assert cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12]
    assert cu_seqlens.dtype == torch.int32 and longest == 4
    with pytest.raises(ValueError, match="position_ids must be \\[B, S\\]"):
        cu_seqlens_from_position_ids(positions[0])


def test_varlen_attention_gives_the_logits_of_each_sample_alone(models):
    plain, fast = models
    batch = _packed_batch(plain.config.vocab_size)
    with torch.no_grad():
        packed = fast(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            **packed_attention_kwargs(batch["position_ids"]),
        ).logits
        masked = plain(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        start = 0
        for length in SAMPLE_LENGTHS[0]:
            alone = plain(input_ids=batch["input_ids"][:1, start : start + length]).logits
            torch.testing.assert_close(packed[:1, start : start + length], alone, rtol=1e-5, atol=1e-5)
            start += length
    torch.testing.assert_close(packed, masked, rtol=1e-5, atol=1e-5)


def test_collated_offsets_give_the_logits_of_the_position_ids(models):
    """The training step's path: offsets from the packer's lengths (collate_packs), no sync on the device."""
    plain, fast = models
    lengths = [n for row in SAMPLE_LENGTHS for n in row]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.random.default_rng(5).integers(3, plain.config.vocab_size, offsets[-1])
    samples = TokenizedSamples(tokens, np.ones(tokens.size, bool), offsets)
    bins = np.concatenate([[0], np.cumsum([len(row) for row in SAMPLE_LENGTHS])])
    plan = PackPlan(bins, np.arange(len(lengths)), capacity=64, real_tokens=int(offsets[-1]))
    batch = collate_packs(list(PackedDataset(samples, plan, pad_id=0)), torch.device("cpu"))
    with torch.no_grad():
        want = plain(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        got = fast(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            **packed_attention_kwargs(batch["position_ids"], batch["cu_seqlens"]),
        ).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_varlen_attention_rejects_a_padding_mask(models):
    _, fast = models
    batch = _packed_batch(fast.config.vocab_size)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="does not take padding masks"):
        fast(input_ids=batch["input_ids"], attention_mask=mask)


def _plain_sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = Policy(model)(batch["input_ids"], batch["position_ids"]).logits
    total, count = token_cross_entropy_sum(logits, shifted_targets(**_target_args(batch)))
    return total / count


def _fast_sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    hidden, weight = hidden_states_and_head(
        model, batch["input_ids"], batch["position_ids"], **packed_attention_kwargs(batch["position_ids"])
    )
    targets = shifted_targets(**_target_args(batch))
    total, count = chunked_token_cross_entropy_sum(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size
    )
    return total / count


def _target_args(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": batch["input_ids"],
        "loss_mask": batch["loss_mask"],
        "position_ids": batch["position_ids"],
    }


def test_fast_sft_step_matches_plain_loss_and_every_gradient(models):
    plain, fast = models
    batch = _packed_batch(plain.config.vocab_size, seed=1)
    plain.zero_grad(set_to_none=True)
    fast.zero_grad(set_to_none=True)
    want = _plain_sft_loss(plain, batch)
    got = _fast_sft_loss(fast, batch, chunk_size=37)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    fast_params = dict(fast.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(fast_params[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fast_completion_logprobs_match_the_grpo_trainer(models):
    plain, fast = models
    g = torch.Generator().manual_seed(4)
    rows, length, t_max = 3, 40, 12
    input_ids = torch.randint(3, plain.config.vocab_size, (rows, length), generator=g)
    tensors = {
        "input_ids": input_ids,
        "prompt_lens": torch.tensor([5, 17, 28]),
        "completion_mask": torch.ones(rows, t_max, dtype=torch.bool),
    }
    want_logps, want_entropy = completion_logprobs(Policy(plain), tensors, slice(0, rows), temperature=0.8)

    # Position p predicts token p + 1: completion token t sits at prompt_len + t (as completion_logprobs).
    index = (tensors["prompt_lens"][:, None] - 1 + torch.arange(t_max)[None, :]).clamp(max=length - 2)
    positions = torch.arange(length).expand(rows, -1)
    hidden, weight = hidden_states_and_head(fast, input_ids, positions)
    picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    targets = input_ids.gather(1, index + 1)
    logps, entropy = chunked_token_logprobs(
        picked.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), temperature=0.8, chunk_size=10
    )
    torch.testing.assert_close(logps.view(rows, t_max), want_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.view(rows, t_max), want_entropy, rtol=1e-5, atol=1e-5)


def test_compiled_decoder_layers_give_the_same_logits(tiny_qwen2_config_path):
    config = AutoConfig.for_model(**json.loads(open(tiny_qwen2_config_path).read()))
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    batch = _packed_batch(config.vocab_size, seed=2)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        # The "eager" backend traces each block with dynamo and runs the captured graph: the wiring, not Inductor.
        assert compile_decoder_layers(model, backend="eager") == config.num_hidden_layers
        got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_hidden_state_path_refuses_models_whose_logits_are_not_hidden_times_head(models):
    plain, _ = models
    batch = _packed_batch(plain.config.vocab_size)
    plain.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(ValueError, match="final_logit_softcapping"):
            hidden_states_and_head(plain, batch["input_ids"], batch["position_ids"])
    finally:
        plain.config.final_logit_softcapping = None
    with pytest.raises(ValueError, match="not a transformers causal LM"):
        hidden_states_and_head(torch.nn.Linear(2, 2), batch["input_ids"], batch["position_ids"])


def test_unpadded_varlen_attention_gives_sdpa_logits_on_padded_rows(tiny_qwen2_config_path):
    """The attention TRL's padded GRPO batches get in the GPU bench (flash-attention's unpad-by-mask path):
    left- and right-padded rows give the logits of sdpa with the same padding mask at every real token."""
    from posttrain.fast.attention import UNPAD_VARLEN_ATTENTION

    register_varlen_attention()
    config = AutoConfig.for_model(**json.loads(open(tiny_qwen2_config_path).read()))
    torch.manual_seed(3)
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    unpad = AutoModelForCausalLM.from_config(
        config, attn_implementation=UNPAD_VARLEN_ATTENTION, dtype=torch.float32
    )
    unpad.load_state_dict(sdpa.state_dict())
    mask = torch.zeros(3, 20, dtype=torch.long)
    mask[0, 4:] = 1  # left padding (a prompt)
    mask[1, :13] = 1  # right padding (a completion)
    mask[2, 2:17] = 1  # both
    input_ids = torch.randint(3, config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = sdpa(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        got = unpad(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        full = unpad(input_ids=input_ids, use_cache=False).logits  # no padding: each row one sequence
        want_full = sdpa(input_ids=input_ids, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, want_full, rtol=1e-5, atol=1e-5)


def test_unpadded_varlen_attention_decodes_like_sdpa(tiny_qwen2_config_path):
    """TRL's generation through the same module (left-padded prompts, a KV cache): transformers' `generate` gives
    sdpa's tokens and logits when the model attends with the unpadding attention."""
    from posttrain.fast.attention import UNPAD_VARLEN_ATTENTION

    register_varlen_attention()
    config = AutoConfig.for_model(**json.loads(open(tiny_qwen2_config_path).read()))
    torch.manual_seed(5)
    sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    unpad = AutoModelForCausalLM.from_config(
        config, attn_implementation=UNPAD_VARLEN_ATTENTION, dtype=torch.float32
    ).eval()
    unpad.load_state_dict(sdpa.state_dict())
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    input_ids = torch.randint(3, config.vocab_size, mask.shape, generator=torch.Generator().manual_seed(6))
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    kwargs.update(pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = sdpa.generate(input_ids, **kwargs)
        got = unpad.generate(input_ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)
