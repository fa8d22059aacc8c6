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


def test_latent_backend_under_autocast_samples_as_the_trainer_scores(tokenizer, repo_root):
    """A GRPO trainer under bf16 autocast scores rollouts with bf16 GEMMs; the latent-cache sampler under the same
    autocast (latents cached in bf16) gives log-probs closer to that score than the fp32 sampler does. (The
    quickstart's model: the sharp attention of `tiny_config` puts both samplers ~0.05 nats from a bf16 score.)"""
    from posttrain.generation.base import SamplingParams
    from posttrain.generation.latent import LatentCacheBackend
    from posttrain.generation.testing import forward_logprobs
    from posttrain.model import DeepseekV3Config

    config = DeepseekV3Config.from_json_file(repo_root / "recipes" / "models" / "tiny_deepseek_v3.json")
    model = DeepseekV3ForCausalLM(config).eval()
    prompts = [tokenizer("What is 12 + 30?")["input_ids"], tokenizer("Name a colour.")["input_ids"]]
    params = SamplingParams(n=3, max_tokens=16, temperature=0.8, seed=5)
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda *args, **kwargs: caches.append(new_cache(*args, **kwargs)) or caches[-1]
    gaps = {}
    for name, autocast in (("fp32", None), ("bf16", "bfloat16")):
        sampled = LatentCacheBackend(model, tokenizer, autocast=autocast).generate(prompts, params)
        gaps[name] = []
        for prompt, completions in zip(prompts, sampled, strict=True):
            for completion in completions:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    scored = forward_logprobs(model, prompt, completion.token_ids, temperature=0.8)
                gaps[name] += (torch.tensor(completion.logprobs, dtype=torch.float64) - scored).abs().tolist()
    assert [cache.c_kv.dtype for cache in caches] == [torch.float32, torch.bfloat16]
    mean = {name: sum(g) / len(g) for name, g in gaps.items()}
    assert max(gaps["bf16"]) < 0.02
    assert mean["bf16"] < 0.5 * mean["fp32"], mean


def test_a_trainers_mixed_precision_reaches_the_latent_backend_unless_the_recipe_says_otherwise(
    tokenizer, tmp_path
):
    from posttrain.config import GenerationSection
    from posttrain.generation.factory import make_backend
    from posttrain.generation.latent import LatentCacheBackend

    model = DeepseekV3ForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()
    trained_in_bf16 = make_backend(GenerationSection(), model, tokenizer, tmp_path, torch.bfloat16)
    assert isinstance(trained_in_bf16, LatentCacheBackend) and trained_in_bf16.autocast is torch.bfloat16
    recipe_says_fp32 = GenerationSection(options={"autocast": None})
    assert make_backend(recipe_says_fp32, model, tokenizer, tmp_path, torch.bfloat16).autocast is None
    assert make_backend(GenerationSection(), model, tokenizer, tmp_path).autocast is None
