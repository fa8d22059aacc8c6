import copy

import pytest
import torch

from posttrain.generation import SamplingParams, build_backend
from posttrain.generation.hf import top_p_mask
from posttrain.generation.testing import forward_logprobs, transformers_greedy


@pytest.fixture
def backend(model, tokenizer):
    return build_backend("hf", model=model, tokenizer=tokenizer)


def test_greedy_equals_transformers_generate_and_logprobs_equal_a_full_forward(backend, model, prompts):
    outputs = backend.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for prompt, (completion,) in zip(prompts, outputs, strict=True):
        assert completion.token_ids == transformers_greedy(model, prompt, 24)
        assert completion.finish_reason == "length" and len(completion.token_ids) == 24
        # The batch was left-padded and decoded with the KV cache; the reference is one unpadded forward.
        reference = forward_logprobs(model, prompt, completion.token_ids)
        torch.testing.assert_close(
            torch.tensor(completion.logprobs, dtype=torch.float64), reference, atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("temperature, top_p", [(0.6, 1.0), (1.7, 0.9)])
def test_sampled_logprobs_are_temperature_scaled_and_taken_before_top_p(
    backend, model, prompts, temperature, top_p
):
    params = SamplingParams(n=2, max_tokens=16, temperature=temperature, top_p=top_p, seed=0)
    for prompt, completions in zip(prompts, backend.generate(prompts, params), strict=True):
        for completion in completions:
            logprobs = torch.tensor(completion.logprobs, dtype=torch.float64)
            scaled = forward_logprobs(model, prompt, completion.token_ids, temperature)
            torch.testing.assert_close(logprobs, scaled, atol=1e-5, rtol=0)
            unscaled = forward_logprobs(model, prompt, completion.token_ids, 1.0)
            assert (logprobs - unscaled).abs().max() > 1e-2  # the temperature really enters the definition


def test_top_p_samples_only_from_the_nucleus(backend, model, prompts):
    params = SamplingParams(n=4, max_tokens=12, temperature=1.0, top_p=0.5, seed=3)
    for prompt, completions in zip(prompts, backend.generate(prompts, params), strict=True):
        for completion in completions:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1 : -1]
            kept = top_p_mask(logits, 0.5).isfinite()
            assert kept[torch.arange(len(completion.token_ids)), completion.token_ids].all()


def test_top_p_mask_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.tensor([[0.5, 0.2, 0.2, 0.1]]).log()
    assert top_p_mask(logits, 0.6).isfinite().tolist() == [[True, True, False, False]]  # 0.5 < 0.6 <= 0.7
    assert top_p_mask(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_mask(logits, 0.95).isfinite().tolist() == [[True, True, True, True]]


def test_stop_string_truncates_text_and_keeps_the_token_that_completed_it(backend, prompts, tokenizer):
    free = backend.generate(prompts[:1], SamplingParams(max_tokens=24, temperature=0))[0][0]
    start = next(i for i in range(8, len(free.text) - 3) if free.text.find(free.text[i : i + 3]) == i)
    stop = free.text[start : start + 3]  # occurs first at `start`, well inside the completion
    params = SamplingParams(max_tokens=24, temperature=0, stop=[stop, "@@"])
    (completion,) = backend.generate(prompts[:1], params)[0]
    assert completion.finish_reason == "stop"
    assert completion.text == free.text[:start]
    cut = len(completion.token_ids)
    assert completion.token_ids == free.token_ids[:cut]
    assert completion.logprobs == pytest.approx(free.logprobs[:cut])
    assert stop in tokenizer.decode(free.token_ids[:cut])
    assert stop not in tokenizer.decode(free.token_ids[: cut - 1])


def test_eos_ends_a_completion_with_stop_and_is_kept(model, tokenizer, prompts):
    greedy = SamplingParams(max_tokens=24, temperature=0)
    free = build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts[:1], greedy)[0][0]
    end = next(i for i in range(5, 24) if free.token_ids[i] not in free.token_ids[:i])
    model.generation_config.eos_token_id = free.token_ids[end]  # a token greedy decoding emits first at `end`
    (completion,) = build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts[:1], greedy)[0]
    assert completion.finish_reason == "stop"
    assert completion.token_ids == free.token_ids[: end + 1] and len(completion.logprobs) == end + 1
    assert completion.text == tokenizer.decode(free.token_ids[:end])  # the EOS token's text is left out


def test_n_samples_per_prompt_and_seeded_reproducibility(backend, prompts):
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7)
    first, again = backend.generate(prompts, params), backend.generate(prompts, params)
    other_seed = backend.generate(prompts, SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=8))
    assert [len(completions) for completions in first] == [3] * len(prompts)
    assert first == again
    assert first != other_seed
    samples = [c.token_ids for c in first[0]]
    assert len({tuple(s) for s in samples}) == 3, "n samples of one prompt must differ"


def test_generation_leaves_the_trainer_module_in_training_mode(backend, model, prompts):
    model.train()
    backend.generate(prompts[:1], SamplingParams(max_tokens=4))
    assert model.training


def test_sync_weights_copies_into_a_separate_engine_model(model, tokenizer, prompts):
    engine_model = copy.deepcopy(model)
    backend = build_backend("hf", model=engine_model, tokenizer=tokenizer)
    before = backend.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    backend.sync_weights(model)
    after = backend.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert after != before
    for prompt, (completion,) in zip(prompts, after, strict=True):
        assert completion.token_ids == transformers_greedy(model, prompt, 12)


def test_bad_prompts_are_rejected_with_the_index(backend):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        backend.generate([[1, 2], []], SamplingParams())
