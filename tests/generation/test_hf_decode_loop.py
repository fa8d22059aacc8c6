"""The hf backend's own decoding loop against transformers `generate` and full forward passes.

Two architectures: a tiny random Qwen2 (grouped K/V heads, decoded with posttrain's grouped-KV SDPA) and
transformers' DeepSeek-V3 (MLA + routed experts). posttrain's own DeepSeek-V3 has no transformers KV cache; it
decodes through the `latent` backend (tests/trainers/test_deepseek_v3_training.py).
"""

import dataclasses
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from posttrain.config import GenerationSection, load_recipe
from posttrain.fast.attention import register_varlen_attention
from posttrain.generation import SamplingParams, build_backend, hf
from posttrain.generation.factory import make_backend
from posttrain.generation.hf import GROUPED_KV_SDPA, grouped_kv_sdpa
from posttrain.generation.testing import build_tiny_deepseek_v3, forward_logprobs
from posttrain.policy import compute_dtype
from posttrain.traces import pipeline
from posttrain.traces.config import TracesRecipe

GREEDY = SamplingParams(max_tokens=20, temperature=0)
QUESTIONS = ["two plus three", "what is seven times eight and then minus one", "sum of 12 and 30", "the cat"]


@pytest.fixture(scope="module", params=["qwen2", "deepseek_v3"])
def engine(request, qwen2_dir, tmp_path_factory):
    """(model, tokenizer, prompts of unequal lengths) for each architecture."""
    directory = qwen2_dir
    if request.param == "deepseek_v3":
        directory = build_tiny_deepseek_v3(tmp_path_factory.mktemp("tiny_deepseek_v3"))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = [
        list(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
                "input_ids"
            ]
        )
        for q in QUESTIONS
    ]
    assert len({len(p) for p in prompts}) > 1, "the batch must be left-padded"
    return model, tokenizer, prompts


def record_forwards(model):
    """Record the input shape and attention implementation of every forward of `model`."""
    calls = []

    def hook(_module, _args, kwargs):
        calls.append((tuple(kwargs["input_ids"].shape), model.config._attn_implementation))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_greedy_equals_transformers_generate_and_a_float64_full_forward(engine):
    model, tokenizer, prompts = engine
    calls, handle = record_forwards(model)
    try:
        outputs = build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts, GREEDY)
    finally:
        handle.remove()
    assert calls[0][0] == (len(prompts), max(map(len, prompts)))  # one left-padded prefill of all prompts
    assert all(shape == (len(prompts), 1) for shape, _ in calls[1:])  # then one token per row per forward
    for prompt, (completion,) in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            reference = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=GREEDY.max_tokens,
                do_sample=False,
                top_k=None,
                output_logits=True,
                return_dict_in_generate=True,
            )
        expected = reference.sequences[0, len(prompt) :].tolist()
        assert completion.token_ids == expected
        generate_logprobs = torch.stack(reference.logits, dim=1)[0].double().log_softmax(-1)
        generate_logprobs = generate_logprobs.gather(1, torch.tensor(expected)[:, None]).squeeze(1)
        ours = torch.tensor(completion.logprobs, dtype=torch.float64)
        torch.testing.assert_close(ours, generate_logprobs, atol=1e-5, rtol=0)
        # The trainer's view: one unpadded forward over prompt‖completion, log-softmax in float64.
        torch.testing.assert_close(ours, forward_logprobs(model, prompt, expected), atol=1e-5, rtol=0)


def test_every_sample_of_a_group_has_the_logprobs_of_a_full_forward(engine):
    model, tokenizer, prompts = engine
    params = SamplingParams(n=4, max_tokens=16, temperature=0.8, top_p=0.9, seed=0)
    outputs = build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts, params)
    for prompt, completions in zip(prompts, outputs, strict=True):
        assert len(completions) == 4
        assert len({tuple(c.token_ids) for c in completions}) > 1, "the samples of a prompt must differ"
        for completion in completions:
            recomputed = forward_logprobs(model, prompt, completion.token_ids, temperature=0.8)
            ours = torch.tensor(completion.logprobs, dtype=torch.float64)
            torch.testing.assert_close(ours, recomputed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=20, temperature=1.0, seed=3)])
def test_a_shared_prefill_equals_prefilling_every_copy(engine, params):
    model, tokenizer, prompts = engine
    backend = build_backend("hf", model=model, tokenizer=tokenizer)
    calls, handle = record_forwards(model)
    try:
        shared = backend.generate(prompts, dataclasses.replace(params, n=3))
    finally:
        handle.remove()
    assert calls[0][0][0] == len(prompts)  # each distinct prompt prefilled once...
    assert calls[1][0][0] == 3 * len(prompts)  # ...and decoded three times
    copied = backend.generate([p for p in prompts for _ in range(3)], params)  # every copy prefilled
    assert [c for group in shared for c in group] == [group[0] for group in copied]
    if params.greedy:  # the copies agree (to rounding: routed experts run rows in batches of varying size)
        for group in shared:
            assert group[0].token_ids == group[1].token_ids == group[2].token_ids
            assert group[0].logprobs == pytest.approx(group[2].logprobs, abs=1e-5)


def test_rows_that_end_leave_the_batch_and_the_others_are_unchanged(engine):
    model, tokenizer, prompts = engine
    free = [c for (c,) in build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts, GREEDY)]
    # An EOS token that ends some completions early and never occurs in others.
    candidates = [
        token
        for completion in free
        for token in completion.token_ids[3:10]
        if any(token not in other.token_ids for other in free)
    ]
    assert candidates, "the tiny model's greedy completions share every early token"
    eos = candidates[0]
    configured = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        backend = build_backend("hf", model=model, tokenizer=tokenizer)
    finally:
        model.generation_config.eos_token_id = configured
    calls, handle = record_forwards(model)
    try:
        ended = [c for (c,) in backend.generate(prompts, GREEDY)]
    finally:
        handle.remove()
    assert min(shape[0] for shape, _ in calls[1:]) < len(prompts), "finished rows must leave the batch"
    for before, after in zip(free, ended, strict=True):
        if eos in before.token_ids:
            cut = before.token_ids.index(eos) + 1
            assert after.finish_reason == "stop" and after.token_ids == before.token_ids[:cut]
            assert after.text == tokenizer.decode(before.token_ids[: cut - 1])
        else:
            assert after.finish_reason == "length" and after.token_ids == before.token_ids
            cut = len(before.token_ids)
        assert after.logprobs == pytest.approx(before.logprobs[:cut], abs=1e-5)


def test_stop_strings_cut_each_row_at_its_first_stop(engine):
    model, tokenizer, prompts = engine
    backend = build_backend("hf", model=model, tokenizer=tokenizer)
    free = [c for (c,) in backend.generate(prompts, GREEDY)]
    text = free[1].text
    start = next(i for i in range(4, len(text) - 2) if text.find(text[i : i + 2]) == i)
    stop = [text[start : start + 2], "never in any completion"]
    calls, handle = record_forwards(model)
    try:
        stopped = [c for (c,) in backend.generate(prompts, dataclasses.replace(GREEDY, stop=stop))]
    finally:
        handle.remove()
    assert len(stopped[1].token_ids) < GREEDY.max_tokens - 1
    assert min(shape[0] for shape, _ in calls[1:]) < len(prompts), "stopped rows must leave the batch"
    assert stopped[1].text == text[:start]
    for before, after in zip(free, stopped, strict=True):
        at = min((i for s in stop if (i := before.text.find(s)) != -1), default=None)
        cut = len(after.token_ids)
        if at is None:  # decoded in a batch that shrank as the other rows stopped
            assert (after.token_ids, after.text, after.finish_reason) == (
                before.token_ids,
                before.text,
                "length",
            )
        else:
            assert after.finish_reason == "stop" and after.text == before.text[:at]
            assert after.token_ids == before.token_ids[:cut]
            assert any(s in tokenizer.decode(before.token_ids[:cut]) for s in stop)  # the token completing it
            assert not any(
                s in tokenizer.decode(before.token_ids[: cut - 1]) for s in stop
            )  # is kept, no more
        assert after.logprobs == pytest.approx(before.logprobs[:cut], abs=1e-5)


def test_max_tokens_bounds_every_completion(engine):
    model, tokenizer, prompts = engine
    backend = build_backend("hf", model=model, tokenizer=tokenizer)
    long = backend.generate(prompts, GREEDY)
    for max_tokens in (1, 5):
        short = backend.generate(prompts, dataclasses.replace(GREEDY, max_tokens=max_tokens))
        for (bounded,), (free,) in zip(short, long, strict=True):
            assert bounded.token_ids == free.token_ids[:max_tokens]
            assert bounded.finish_reason == ("length" if len(bounded.token_ids) == max_tokens else "stop")
            assert bounded.logprobs == pytest.approx(free.logprobs[:max_tokens], abs=1e-5)


def test_seeds_and_the_global_rng(model, tokenizer, prompts):
    backend = build_backend("hf", model=model, tokenizer=tokenizer)
    params = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=11)
    state = torch.get_rng_state()
    first = backend.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), state), "a seeded call must leave torch's global RNG alone"
    assert backend.generate(prompts, params) == first
    assert backend.generate(prompts, dataclasses.replace(params, seed=12)) != first
    unseeded = dataclasses.replace(params, seed=None)
    assert backend.generate(prompts, unseeded) != backend.generate(prompts, unseeded)  # draws advance the RNG
    chunked = build_backend("hf", model=model, tokenizer=tokenizer, max_batch_size=3)
    greedy = dataclasses.replace(GREEDY, n=2)
    for ours, theirs in zip(
        chunked.generate(prompts, greedy), backend.generate(prompts, greedy), strict=True
    ):
        for a, b in zip(ours, theirs, strict=True):  # chunks of 3 split the groups of 2
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_grouped_kv_sdpa_equals_transformers_sdpa():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, h, s, 16, generator=generator) for h, s in [(4, 1), (2, 7), (2, 7)])
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :3] = False  # a left-padded row
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    prefill = [torch.randn(3, h, 7, 16, generator=generator) for h in (4, 2, 2)]
    causal = mask & torch.ones(7, 7, dtype=torch.bool).tril()
    for (q, k, v), attention_mask in [
        ((query, key, value), mask),  # decoding: each K/V head's query heads folded into one SDPA call
        ((query, key, value), None),
        (prefill, causal),
    ]:
        ours, _ = grouped_kv_sdpa(module, q, k, v, attention_mask, scaling=0.25)
        reference, _ = sdpa_attention_forward(module, q, k, v, attention_mask, scaling=0.25)
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_attention_implementation_is_switched_for_decoding_only(model, tokenizer, prompts):
    reference = build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts, GREEDY)
    # posttrain trains transformers models on CUDA with packed-row attention, which takes no padding mask.
    model.set_attn_implementation(register_varlen_attention())
    calls, handle = record_forwards(model)
    try:
        outputs = build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts, GREEDY)
    finally:
        handle.remove()
    assert {implementation for _, implementation in calls} == {GROUPED_KV_SDPA}
    assert model.config._attn_implementation == "posttrain_varlen"
    for (ours,), (expected,) in zip(outputs, reference, strict=True):
        assert ours.token_ids == expected.token_ids
        assert ours.logprobs == pytest.approx(expected.logprobs, abs=1e-5)


def test_static_decoding_equals_the_growing_mask_loop(engine):
    """The fixed-shape inputs that CUDA graphs replay (run uncaptured on CPU): same tokens, log-probs, ends."""
    model, tokenizer, prompts = engine
    params = dataclasses.replace(GREEDY, n=2)
    free = build_backend("hf", model=model, tokenizer=tokenizer, decode="dynamic").generate(prompts, params)
    free = [c for group in free for c in group]
    # An EOS that ends some rows early, so the static batch keeps finished rows the dynamic one drops.
    eos = next(t for c in free for t in c.token_ids[3:10] if any(t not in o.token_ids for o in free))
    configured = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        dynamic = build_backend("hf", model=model, tokenizer=tokenizer, decode="dynamic")
        static = build_backend("hf", model=model, tokenizer=tokenizer, decode="static")
    finally:
        model.generation_config.eos_token_id = configured
    calls, handle = record_forwards(model)
    try:
        ours = static.generate(prompts, params)
    finally:
        handle.remove()
    assert all(shape == (len(prompts) * params.n, 1) for shape, _ in calls[1:])  # the batch never shrinks
    expected = dynamic.generate(prompts, params)
    assert {c.finish_reason for group in expected for c in group} == {"stop", "length"}
    for mine, theirs in zip(ours, expected, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_static_decoding_samples_with_the_logprobs_of_a_full_forward(engine):
    model, tokenizer, prompts = engine
    params = SamplingParams(n=3, max_tokens=16, temperature=0.8, top_p=0.9, seed=5)
    outputs = build_backend("hf", model=model, tokenizer=tokenizer, decode="static").generate(prompts, params)
    for prompt, completions in zip(prompts, outputs, strict=True):
        assert len({tuple(c.token_ids) for c in completions}) > 1, "the samples of a prompt must differ"
        for completion in completions:
            recomputed = forward_logprobs(model, prompt, completion.token_ids, temperature=0.8)
            torch.testing.assert_close(
                torch.tensor(completion.logprobs, dtype=torch.float64), recomputed, atol=1e-5, rtol=0
            )


def test_static_decoding_needs_sdpa_attention(model, tokenizer, prompts):
    model.set_attn_implementation("eager")
    with pytest.raises(
        ValueError, match="decode='static' needs SDPA attention; the model attends with 'eager'"
    ):
        build_backend("hf", model=model, tokenizer=tokenizer, decode="static").generate(prompts, GREEDY)
    reference = build_backend("hf", model=model, tokenizer=tokenizer, decode="dynamic").generate(
        prompts, GREEDY
    )
    assert build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts, GREEDY) == reference
    with pytest.raises(ValueError, match="decode must be 'auto', 'dynamic' or 'static', got 'graph'"):
        build_backend("hf", model=model, tokenizer=tokenizer, decode="graph")


def test_static_decoding_refuses_sliding_window_layers(qwen2_dir, tokenizer, prompts):
    """A sliding-window layer's static cache is shorter than the full-length mask static decoding feeds."""
    config = AutoConfig.from_pretrained(qwen2_dir)
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir, config=config, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="decode='static' does not support sliding-window attention layers"):
        build_backend("hf", model=model, tokenizer=tokenizer, decode="static").generate(prompts, GREEDY)


def test_autocast_decoding_samples_as_the_trainer_scores(engine, monkeypatch):
    """A trainer under bf16 autocast scores rollouts with bf16 GEMMs; a sampler under the same autocast (keys and
    values cached in bf16) gives log-probs closer to that score than the fp32 sampler does."""
    model, tokenizer, prompts = engine
    params = SamplingParams(n=3, max_tokens=16, temperature=0.8, seed=5)
    cached = []
    original = hf.CastingStaticCache.update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = original(self, key_states, value_states, layer_idx, *args, **kwargs)
        cached.append((keys.dtype, values.dtype))
        return keys, values

    monkeypatch.setattr(hf.CastingStaticCache, "update", update)
    sampled = {
        decode: build_backend(
            "hf", model=model, tokenizer=tokenizer, decode=decode, autocast="bfloat16"
        ).generate(prompts, params)
        for decode in ("static", "dynamic")
    }
    assert set(cached) == {(torch.bfloat16, torch.bfloat16)}
    assert sampled["static"] == sampled["dynamic"]
    in_fp32 = build_backend("hf", model=model, tokenizer=tokenizer).generate(prompts, params)
    gaps = {"autocast": [], "fp32": []}
    for prompt, ours, theirs in zip(prompts, sampled["static"], in_fp32, strict=True):
        for kind, completion in [*(("autocast", c) for c in ours), *(("fp32", c) for c in theirs)]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                scored = forward_logprobs(model, prompt, completion.token_ids, temperature=0.8)
            gaps[kind] += (torch.tensor(completion.logprobs, dtype=torch.float64) - scored).abs().tolist()
    autocast_gap, fp32_gap = (sum(g) / len(g) for g in (gaps["autocast"], gaps["fp32"]))
    assert max(gaps["autocast"]) < 0.05
    assert autocast_gap < 0.5 * fp32_gap, (autocast_gap, fp32_gap)
    with pytest.raises(ValueError, match="autocast must be 'bfloat16', 'float16' or None, got 'fp8'"):
        build_backend("hf", model=model, tokenizer=tokenizer, autocast="fp8")


def test_a_trainers_mixed_precision_reaches_the_hf_backend_unless_the_recipe_says_otherwise(
    model, tokenizer, tmp_path
):
    trained_in_bf16 = make_backend(
        GenerationSection(backend="hf"), model, tokenizer, tmp_path, torch.bfloat16
    )
    assert trained_in_bf16.autocast is torch.bfloat16
    recipe_says_fp32 = GenerationSection(backend="hf", options={"autocast": None})
    assert make_backend(recipe_says_fp32, model, tokenizer, tmp_path, torch.bfloat16).autocast is None
    assert make_backend(GenerationSection(backend="hf"), model, tokenizer, tmp_path).autocast is None


def test_a_traces_teacher_loaded_with_dtype_auto_computes_in_bf16_on_a_gpu(
    qwen2_dir, repo_root, tokenizer, monkeypatch, tmp_path
):
    """ "auto" loads fp32 weights for bf16 autocast compute (as the trainers do); a traces teacher follows it."""
    monkeypatch.chdir(repo_root)
    overrides = [f"model.path={qwen2_dir}", "generation.backend=hf"]
    auto = load_recipe("recipes/traces_arith.yaml", TracesRecipe, overrides)
    fp32 = load_recipe("recipes/traces_arith.yaml", TracesRecipe, [*overrides, "model.dtype=float32"])
    asked = []
    monkeypatch.setattr(pipeline, "compute_dtype", lambda cfg: asked.append(cfg) or torch.bfloat16)
    assert pipeline.make_teacher_backend(auto, tokenizer, tmp_path).autocast is torch.bfloat16
    assert asked == [auto.model]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_dtype(auto.model) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert compute_dtype(auto.model) is torch.bfloat16
    assert compute_dtype(fp32.model) is None
