"""Per-sample causal attention over packed tokens off CUDA (posttrain.fast.attention): the samples as one padded
batch through SDPA's fused kernel, or one SDPA call per sample when the lengths are too uneven, both against a
float64 attention written out by hand — outputs and gradients of q, k and v, with MLA's narrower v and with
grouped K/V heads."""

import pytest
import torch
import torch.nn.functional as F

import posttrain.fast.attention as attention


def _reference(q, k, v, cu_seqlens, scale):
    """softmax(q kᵀ · scale + causal mask) v within each sample, in float64, K/V heads repeated for the groups."""
    q, k, v = (x.double() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * scale
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", probs, v[start:end]))
    return torch.cat(out)


def _inputs(lengths, heads, kv_heads, qk_dim, v_dim):
    torch.manual_seed(0)
    tokens = sum(lengths)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(tokens, heads, qk_dim, requires_grad=True)
    k = torch.randn(tokens, kv_heads, qk_dim, requires_grad=True)
    v = torch.randn(tokens, kv_heads, v_dim, requires_grad=True)
    return q, k, v, cu_seqlens


def _check_against_reference(function, lengths, heads=4, kv_heads=4, qk_dim=24, v_dim=16):
    q, k, v, cu_seqlens = _inputs(lengths, heads, kv_heads, qk_dim, v_dim)
    scale = 0.29  # not 1/sqrt(qk_dim), as under YaRN
    got = function(q, k, v, cu_seqlens, scale)
    expected = _reference(q, k, v, cu_seqlens, scale)
    assert got.shape == (sum(lengths), heads, v_dim)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(got.shape, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream.float())
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    for name, g, e in zip("qkv", got_grads, expected_grads, strict=True):
        torch.testing.assert_close(
            g, e, rtol=1e-4, atol=1e-5, msg=lambda message, name=name: f"{name}: {message}"
        )


# Packed SFT rows: samples of similar length (the padded batch), a one-token sample included.
EVEN = [9, 14, 1, 12, 11, 13]
# One long sample among short ones: a padded batch would be mostly padding.
UNEVEN = [40, 2, 3, 1, 2, 2]


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("v_dim", [16, 24])
def test_padded_batch_equals_float64_attention(kv_heads, v_dim):
    _check_against_reference(attention._padded_batch_sdpa, EVEN, kv_heads=kv_heads, v_dim=v_dim)


def test_sample_by_sample_equals_float64_attention():
    _check_against_reference(attention._sample_by_sample_sdpa, UNEVEN, kv_heads=2)


@pytest.mark.parametrize(("lengths", "expected"), [(EVEN, "padded"), (UNEVEN, "one by one")])
def test_padding_bound_picks_the_path(monkeypatch, lengths, expected):
    _check_against_reference(attention._per_sample_sdpa, lengths)
    chosen = []
    monkeypatch.setattr(attention, "_padded_batch_sdpa", lambda *args: chosen.append("padded"))
    monkeypatch.setattr(attention, "_sample_by_sample_sdpa", lambda *args: chosen.append("one by one"))
    q, k, v, cu_seqlens = _inputs(lengths, 2, 2, 8, 8)
    attention.packed_attention(q, k, v, cu_seqlens, max(lengths), 0.5)
    # EVEN: 6 rows of 14 slots for 60 tokens (1.4 per token); UNEVEN: 6 rows of 40 for 50 (4.8 per token)
    assert chosen == [expected]


@pytest.mark.parametrize("queries", [1, 3])
def test_grouped_query_attention_equals_sdpa_over_copied_kv_heads(queries):
    """Decoding over grouped K/V heads without copying them: the result of SDPA after transformers' repeat_kv."""
    from transformers.integrations.sdpa_attention import repeat_kv

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, queries, 16, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(2, 2, 9, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    allowed = torch.ones(2, 1, queries, 9, dtype=torch.bool).tril(diagonal=9 - queries)
    allowed[0, ..., :4] = False  # a left-padded row
    got = attention.grouped_query_attention(query, key, value, allowed, scale=0.3)
    want = F.scaled_dot_product_attention(
        query, repeat_kv(key, 3), repeat_kv(value, 3), attn_mask=allowed, scale=0.3
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
