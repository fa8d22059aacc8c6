"""GRPO scoring rollouts as packed rows (grpo.pack_tokens) gives what the padded rows give: the same completion
log-probs and entropies, the same loss and the same parameter gradients, on a transformers Qwen2 and on
posttrain's own DeepSeek-V3; and a recipe with pack_tokens trains like one without it."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.algorithms.grpo import GRPOLossConfig
from posttrain.config import GRPORecipe, load_recipe
from posttrain.model import DeepseekV3Config, DeepseekV3ForCausalLM
from posttrain.policy import Policy
from posttrain.trainers.grpo import micro_batch_loss, train_grpo
from posttrain.trainers.grpo_layouts import (
    completion_logprobs,
    frozen_logprobs,
    micro_batches,
    padded_sequences,
    shared_prompt_mask,
)
from tests.trainers.test_grpo_trainer import rows, tiny_policy, write_recipe  # noqa: F401 (a fixture)

PACK_TOKENS = 40
TEMPERATURE = 0.7


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(kind: str, repo_root) -> Policy:
    torch.manual_seed(0)
    if kind == "qwen2":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(
            **json.loads((repo_root / "recipes/models/tiny_qwen2.json").read_text())
        )
        # as build_policy loads it on CPU: packed samples told apart by their restarting position ids
        return Policy(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"))
    config = DeepseekV3Config.from_dict(
        json.loads((repo_root / "recipes/models/tiny_deepseek_v3.json").read_text())
    )
    return Policy(DeepseekV3ForCausalLM(config))


def rollouts(vocab: int) -> dict[str, torch.Tensor]:
    """Nine sequences of unequal prompt (3-14) and completion (1-16) lengths, groups of three."""
    g = torch.Generator().manual_seed(1)
    prompt_lens = [3, 14, 8, 5, 11, 9, 4, 12, 6]
    completion_lens = [16, 2, 9, 1, 13, 7, 16, 5, 11]
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in completion_lens]
    tensors = padded_sequences(prompts, completions, pad_id=0)
    tensors["sampler_logps"] = -torch.rand(tensors["completion_mask"].shape, generator=g)
    return tensors


def score(policy: Policy, tensors: dict, batches: list, chunk: int | None) -> dict[str, torch.Tensor]:
    """Every completion token's log-prob and entropy, then the step's loss and gradients as the trainer makes
    them (one backward per micro-batch, losses normalised by the step's counts)."""
    parts = [completion_logprobs(policy, tensors, micro, TEMPERATURE, chunk) for micro in batches]
    logps = torch.zeros(tensors["completion_mask"].shape)
    entropy = torch.zeros(tensors["completion_mask"].shape)
    for micro, (lp, ent) in zip(batches, parts, strict=True):
        logps[micro.sequences], entropy[micro.sequences] = lp.detach(), ent.detach()

    n = len(tensors["input_ids"])
    advantages = torch.linspace(-1.0, 1.0, n)
    mask = tensors["completion_mask"]
    counts = torch.stack([mask.sum(), torch.tensor(n)])
    frozen = frozen_logprobs(policy, tensors, batches, TEMPERATURE, chunk)
    ref_logps, old_logps = frozen - 0.05 * mask, frozen + 0.1 * mask  # a nearby π_ref; a π_old that clips
    policy.zero_grad()
    loss = torch.zeros(())
    for loss_type in ("dapo", "grpo"):  # global token mean, and per-sequence mean
        config = GRPOLossConfig(beta=0.04, loss_type=loss_type, max_completion_length=16)
        for micro in batches:
            part, _ = micro_batch_loss(
                policy,
                tensors,
                micro,
                advantages,
                config,
                counts,
                TEMPERATURE,
                chunk,
                old_logps=old_logps,
                ref_logps=ref_logps,
            )
            part.backward()
            loss = loss + part.detach()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return {"logps": logps, "entropy": entropy, "frozen": frozen, "loss": loss, "grads": grads}


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_packed_rows_give_the_padded_rows_logprobs_loss_and_gradients(kind, repo_root):
    policy = tiny_model(kind, repo_root)
    tensors = rollouts(policy.model.config.vocab_size)
    mask = tensors["completion_mask"]
    padded = micro_batches(tensors, micro_batch_size=4, pack_tokens=None)
    packed = micro_batches(tensors, micro_batch_size=4, pack_tokens=PACK_TOKENS)

    # every sequence in exactly one pack, no pack over capacity, several packs, most holding several sequences
    assert sorted(torch.cat([m.sequences for m in packed]).tolist()) == list(range(len(mask)))
    assert all(m.input_ids.shape[1] <= PACK_TOKENS for m in packed)
    assert 3 <= len(packed) < len(mask) - 3
    first = packed[0]
    assert (
        first.position_ids[0, 0] == 0 and (first.position_ids[0, 1:] == 0).sum() == len(first.sequences) - 1
    )

    want = score(policy, tensors, padded, chunk=None)  # the plain path: padded rows, full logits
    for chunk in (None, 8):
        got = score(policy, tensors, packed, chunk=chunk)
        for key in ("logps", "entropy", "frozen"):
            torch.testing.assert_close(got[key][mask], want[key][mask], atol=1e-5, rtol=1e-5, msg=key)
            assert (got[key][~mask] == 0).all()  # nothing past a completion's end
        torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-4, atol=1e-7)
        assert want["grads"].keys() == got["grads"].keys() and len(want["grads"]) > 10
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_sequence_longer_than_pack_tokens_is_refused_with_its_length():
    tensors = padded_sequences([[5] * 30, [6] * 4], [[7] * 15, [8] * 3], pad_id=0)
    with pytest.raises(ValueError, match=r"grpo.pack_tokens=40 .*sequence 0 .*45 tokens"):
        micro_batches(tensors, micro_batch_size=4, pack_tokens=40)


def test_grpo_with_pack_tokens_or_shared_prompts_trains_like_padded_rows(tmp_path, tiny_policy, repo_root):  # noqa: F811
    """Same seed, same rollouts at step 1: the first step (loss, KL, entropy, gradient norm) of a packed run and
    of a shared-prompt run is the padded run's; then each goes on through a second step."""
    arms = {
        "padded": {},
        "packed": {"pack_tokens": 160},
        "shared_prompt": {"share_prompt": True},
    }
    runs = {}
    for name, layout in arms.items():
        path = write_recipe(
            tmp_path, tiny_policy, repo_root, name, num_iterations=2, loss={"beta": 0.05}, **layout
        )
        train_grpo(load_recipe(path, GRPORecipe, ["train.max_steps=2", "data.eval=[]"]))
        runs[name] = [r for r in rows(tmp_path / name) if "loss" in r]
    padded = runs["padded"][0]
    for name in ("packed", "shared_prompt"):
        assert [r["step"] for r in runs[name]] == [1, 2]
        first = runs[name][0]
        assert first["completion_length/mean"] == padded["completion_length/mean"]  # the same rollouts
        for key in ("loss", "kl", "entropy", "grad_norm", "gap/max_abs"):
            assert first[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), (name, key)
        assert first["gap/max_abs"] < 1e-4  # the trainer's log-probs are the sampler's


def test_pack_tokens_too_small_for_the_prompts_fails_before_training(tmp_path, tiny_policy, repo_root):  # noqa: F811
    path = write_recipe(tmp_path, tiny_policy, repo_root, "small", pack_tokens=16)
    with pytest.raises(
        ValueError, match=r"grpo.pack_tokens=16 cannot hold the longest prompt .*max_tokens=12"
    ):
        train_grpo(load_recipe(path, GRPORecipe))


def grouped_rollouts(vocab: int) -> dict[str, torch.Tensor]:
    """Three prompts (lengths 3, 14, 8), three completions each (lengths 1-16)."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 14, 8) for _ in range(3)]
    prompts = [prompts[3 * (i // 3)] for i in range(9)]
    completion_lens = [16, 2, 9, 1, 13, 7, 16, 5, 11]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in completion_lens]
    tensors = padded_sequences(prompts, completions, pad_id=0)
    tensors["sampler_logps"] = -torch.rand(tensors["completion_mask"].shape, generator=g)
    return tensors


def test_shared_prompt_mask_by_hand():
    # one row: prompt (2 tokens), completion 1 (2 tokens), completion 2 (1 token), then a second segment
    # (prompt 1 token, completion 1 token) and one padding token
    segment = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0, 1, 0]])
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 0],  # completion 2 sees the prompt and itself, not completion 1
            [0, 0, 0, 0, 0, 1, 0, 0],  # a new segment sees nothing of the first
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 1],  # padding sees only itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(shared_prompt_mask(segment, branch), want[None, None])


@pytest.mark.parametrize("kind", ["qwen2", "deepseek_v3"])
def test_shared_prompt_rows_give_the_padded_rows_logprobs_loss_and_gradients(kind, repo_root):
    policy = tiny_model(kind, repo_root)
    tensors = grouped_rollouts(policy.model.config.vocab_size)
    mask = tensors["completion_mask"]
    want = score(policy, tensors, micro_batches(tensors, micro_batch_size=4, pack_tokens=None), chunk=None)
    one_per_row = micro_batches(tensors, micro_batch_size=6, pack_tokens=None, share_prompt_groups=3)
    packed = micro_batches(tensors, micro_batch_size=6, pack_tokens=70, share_prompt_groups=3)
    # segments of 3 + 27, 14 + 21 and 8 + 32 tokens: two per micro-batch, one per padded row ...
    assert [tuple(m.input_ids.shape) for m in one_per_row] == [(2, 35), (1, 40)]
    # ... or binned into rows of 70 tokens: 40 + 30 and 35
    assert [m.sequences.tolist() for m in packed] == [[0, 1, 2, 6, 7, 8], [3, 4, 5]]
    assert [m.input_ids.shape[1] for m in packed] == [70, 35]
    for batches in (one_per_row, packed):
        for chunk in (None, 8):
            got = score(policy, tensors, batches, chunk=chunk)
            for key in ("logps", "entropy", "frozen"):
                torch.testing.assert_close(got[key][mask], want[key][mask], atol=1e-5, rtol=1e-5, msg=key)
                assert (got[key][~mask] == 0).all()
            torch.testing.assert_close(got["loss"], want["loss"], rtol=1e-4, atol=1e-7)
            assert want["grads"].keys() == got["grads"].keys() and len(want["grads"]) > 10
            for name, grad in want["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_prompt_refuses_groups_without_one_prompt():
    tensors = padded_sequences([[5, 6], [5, 7], [8], [8]], [[1], [2], [3], [4]], pad_id=0)
    with pytest.raises(ValueError, match=r"sequences 0..1 do not share one prompt"):
        micro_batches(tensors, micro_batch_size=4, pack_tokens=None, share_prompt_groups=2)
    shared = padded_sequences([[5, 6], [5, 6]], [[1, 2], [3]], pad_id=0)
    with pytest.raises(ValueError, match=r"grpo.pack_tokens=4 is shorter than group 0 .*\(5 tokens\)"):
        micro_batches(shared, micro_batch_size=4, pack_tokens=4, share_prompt_groups=2)


def test_shared_prompt_with_a_maskless_attention_fails_before_training(tmp_path, tiny_policy, repo_root):  # noqa: F811
    path = write_recipe(tmp_path, tiny_policy, repo_root, "varlen", share_prompt=True)
    recipe = load_recipe(path, GRPORecipe, ["model.attn_implementation=varlen"])
    with pytest.raises(ValueError, match=r"grpo.share_prompt needs attention that takes a dense mask"):
        train_grpo(recipe)
    assert not (tmp_path / "varlen" / "metrics.jsonl").exists()
