"""Greedy decoding over the latent cache matches transformers; MTP speculative decoding matches greedy."""

import pytest
import torch
from tiny_deepseek import tiny_config
from transformers import DeepseekV3ForCausalLM as HFModel

from posttrain.model import DeepseekV3ForCausalLM, generate_greedy, generate_speculative

PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 71, 8], [33]]


@pytest.fixture
def model():
    return DeepseekV3ForCausalLM(tiny_config()).eval()


def test_greedy_matches_transformers_generate(model, tmp_path):
    model.save_pretrained(tmp_path)
    hf = HFModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = generate_greedy(model, PROMPTS, max_new_tokens=12)
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :]
        assert tokens == expected.tolist()


def _oracle_drafts(model, reference, wrong_every=None):
    """Replace the MTP module's logits by the true continuation (so drafts are right), except every
    `wrong_every`-th draft, while still running the module so its cache advances as usual."""
    real_step = model.mtp_decode_step
    calls = {"n": 0}

    def step(h_prev, next_ids, cache, num_new=None):
        start = cache.lengths.clone()
        logits, hidden = real_step(h_prev, next_ids, cache, num_new)
        logits = torch.zeros_like(logits)
        for row in range(logits.shape[0]):
            for slot in range(logits.shape[1]):
                target = int(start[row]) + slot + 2  # MTP slot i drafts token i + 2 of the sequence
                if target < len(reference[row]):
                    calls["n"] += 1
                    wrong = wrong_every is not None and calls["n"] % wrong_every == 0
                    logits[row, slot, (reference[row][target] + int(wrong)) % logits.shape[-1]] = 1.0
        return logits, hidden

    model.mtp_decode_step = step


def test_speculative_decoding_equals_greedy(model):
    greedy = generate_greedy(model, PROMPTS, max_new_tokens=16)
    tokens, stats = generate_speculative(model, PROMPTS, max_new_tokens=16)
    assert tokens == greedy
    assert 0 <= stats["acceptance_rate"] <= 1 and stats["drafted"] >= 15

    reference = [p + g for p, g in zip(PROMPTS, greedy, strict=True)]
    _oracle_drafts(model, reference)
    tokens, stats = generate_speculative(model, PROMPTS, max_new_tokens=16)
    assert tokens == greedy
    assert stats["acceptance_rate"] == 1.0 and stats["main_steps"] == 8  # two tokens per main-model step

    _oracle_drafts(model, reference, wrong_every=3)  # rows accept and reject at different steps
    tokens, stats = generate_speculative(model, PROMPTS, max_new_tokens=16)
    assert tokens == greedy
    assert 0.3 < stats["acceptance_rate"] < 0.9


def test_eos_stops_both_decoders_alike(model):
    greedy = generate_greedy(model, PROMPTS, max_new_tokens=10)
    eos = greedy[1][4]
    stopped = generate_greedy(model, PROMPTS, max_new_tokens=10, eos_token_id=eos)
    assert stopped[1] == greedy[1][: greedy[1].index(eos) + 1]
    assert generate_speculative(model, PROMPTS, max_new_tokens=10, eos_token_id=eos)[0] == stopped
