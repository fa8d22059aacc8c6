"""The chunked output-head losses give the plain path's numbers: values and gradients w.r.t. hidden and W."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from posttrain.algorithms.sft import IGNORE_INDEX, token_cross_entropy_sum
from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum, chunked_token_logprobs


def _leaves(n: int, d: int, v: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=dtype) / d**0.5).requires_grad_()
    return hidden, weight, g


def _grads(value: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, leaves))


@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
def test_cross_entropy_sum_matches_plain_values_and_gradients(chunk_size):
    hidden, weight, g = _leaves(n=97, d=24, v=301, seed=chunk_size)
    targets = torch.randint(0, 301, (97,), generator=g)
    targets[torch.rand(97, generator=g) < 0.3] = IGNORE_INDEX

    total, count = chunked_token_cross_entropy_sum(hidden, weight, targets, chunk_size=chunk_size)
    ref_total, ref_count = token_cross_entropy_sum(hidden @ weight.T, targets)

    assert int(count) == int(ref_count) == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-4)
    for got, want in zip(
        _grads(3.0 * total, hidden, weight), _grads(3.0 * ref_total, hidden, weight), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cross_entropy_sum_against_float64_hand_computation():
    hidden, weight, g = _leaves(n=10, d=5, v=13, seed=3, dtype=torch.float64)
    targets = torch.randint(0, 13, (10,), generator=g)
    targets[2] = IGNORE_INDEX
    logits = hidden.detach() @ weight.detach().T
    keep = targets != IGNORE_INDEX
    want = (logits.logsumexp(-1) - logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1))[keep].sum()
    got, _ = chunked_token_cross_entropy_sum(hidden, weight, targets, chunk_size=3)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)


def test_rows_without_targets_give_zero_loss_and_zero_gradient():
    hidden, weight, _ = _leaves(n=6, d=4, v=9, seed=1)
    targets = torch.full((6,), IGNORE_INDEX)
    total, count = chunked_token_cross_entropy_sum(hidden, weight, targets, chunk_size=4)
    grad_hidden, grad_weight = _grads(total, hidden, weight)
    assert float(total.detach()) == 0.0 and int(count) == 0
    assert not grad_hidden.any() and not grad_weight.any()


def test_cross_entropy_under_bf16_autocast_follows_the_autocast_lm_head():
    hidden, weight, g = _leaves(n=64, d=32, v=200, seed=5)
    targets = torch.randint(0, 200, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = chunked_token_cross_entropy_sum(hidden, weight, targets, chunk_size=16)
        ref, _ = token_cross_entropy_sum(F.linear(hidden, weight), targets)
    torch.testing.assert_close(total, ref, rtol=1e-3, atol=1e-2)
    grads, ref_grads = _grads(total, hidden, weight), _grads(ref, hidden, weight)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32  # the fp32 master leaves get fp32 gradients
        assert (got - want).norm() / want.norm() < 1e-2


def test_no_grad_call_returns_the_same_value():
    hidden, weight, g = _leaves(n=20, d=8, v=50, seed=2)
    targets = torch.randint(0, 50, (20,), generator=g)
    with torch.no_grad():
        frozen, _ = chunked_token_cross_entropy_sum(hidden, weight, targets, chunk_size=6)
    live, _ = chunked_token_cross_entropy_sum(hidden, weight, targets, chunk_size=6)
    assert not frozen.requires_grad
    torch.testing.assert_close(frozen, live.detach(), rtol=0, atol=0)


def _plain_logprobs(hidden, weight, targets, temperature):
    log_probs = F.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    return log_probs.gather(1, targets[:, None]).squeeze(1), -(log_probs.exp() * log_probs).sum(-1)


@pytest.mark.parametrize(("temperature", "chunk_size"), [(1.0, 5), (0.7, 16), (1.3, 500)])
def test_logprobs_and_entropy_match_plain_values_and_gradients(temperature, chunk_size):
    hidden, weight, g = _leaves(n=53, d=16, v=211, seed=int(10 * temperature))
    targets = torch.randint(0, 211, (53,), generator=g)
    up_logps, up_entropy = torch.randn(53, generator=g), torch.randn(53, generator=g)

    logps, entropy = chunked_token_logprobs(hidden, weight, targets, temperature, chunk_size)
    ref_logps, ref_entropy = _plain_logprobs(hidden, weight, targets, temperature)

    torch.testing.assert_close(logps, ref_logps, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-6, atol=1e-5)
    got = _grads((up_logps * logps).sum() + (up_entropy * entropy).sum(), hidden, weight)
    want = _grads((up_logps * ref_logps).sum() + (up_entropy * ref_entropy).sum(), hidden, weight)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_logprobs_gradient_through_log_probs_alone():
    hidden, weight, g = _leaves(n=12, d=8, v=40, seed=9)
    targets = torch.randint(0, 40, (12,), generator=g)
    logps, _ = chunked_token_logprobs(hidden, weight, targets, 1.0, 5)
    ref_logps, _ = _plain_logprobs(hidden, weight, targets, 1.0)
    for a, b in zip(
        _grads(logps.sum(), hidden, weight), _grads(ref_logps.sum(), hidden, weight), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    hidden, weight, _ = _leaves(n=4, d=3, v=7, seed=0)
    with pytest.raises(ValueError, match="targets must be \\[N\\]"):
        chunked_token_cross_entropy_sum(hidden, weight, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_head_weight \\[V, d\\]"):
        chunked_token_cross_entropy_sum(hidden, weight[:, :2], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids in \\[0, 7\\), got \\[0, 7\\]"):
        chunked_token_logprobs(hidden, weight, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="got \\[-1, 2\\]"):
        chunked_token_logprobs(hidden, weight, torch.tensor([0, -1, 2, 2]))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_cross_entropy_sum(hidden, weight, torch.zeros(4, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="loss impl"):
        chunked_token_cross_entropy_sum(hidden, weight, torch.zeros(4, dtype=torch.long), impl="fast")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="'fused' runs Triton kernels: it needs CUDA"):
            chunked_token_logprobs(hidden, weight, torch.zeros(4, dtype=torch.long), impl="fused")
