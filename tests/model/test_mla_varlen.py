"""MLA over packed rows through cumulative sequence lengths (no dense mask) gives the dense-mask path's numbers:
logits, MTP logits and every gradient, fp32 on CPU (the per-sample SDPA fallback), with YaRN's softmax scale and
v_head_dim != qk_head_dim. The CUDA kernel's wrapper (zero-padded v, explicit scale) is checked against a CPU
stand-in for the kernel that, like FlashAttention, takes a single head dim. The trainers' hidden-states-only
forward skips the output head and keeps the numbers."""

import pytest
import torch
from tiny_deepseek import tiny_config

import posttrain.fast.attention as attention
from posttrain.algorithms.sft import shifted_targets, token_cross_entropy_sum
from posttrain.fast.attention import PackedSamples, cu_seqlens_from_position_ids
from posttrain.model import DeepseekV3ForCausalLM
from posttrain.policy import Policy

# Three packed rows of 24 tokens, a one-token sample included.
SAMPLE_LENGTHS = [[7, 1, 12, 4], [24], [10, 14]]


def _packed_rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in SAMPLE_LENGTHS])
    return torch.randint(0, vocab, positions.shape), positions


def _loss_and_grads(model: DeepseekV3ForCausalLM, ids: torch.Tensor, positions: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    out = model(ids, position_ids=positions, return_mtp=True)
    loss = token_cross_entropy_sum(out.logits, shifted_targets(ids, torch.ones_like(ids), positions))[0]
    mtp_targets = shifted_targets(ids, torch.ones_like(ids), positions, shift=2)
    loss = loss + token_cross_entropy_sum(out.mtp_logits[0], mtp_targets[:, :-1])[0]
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.mtp_logits[0].detach(), grads


def test_varlen_equals_dense_mask_with_grads():
    config = tiny_config()
    assert config.v_head_dim != config.qk_head_dim and config.is_yarn  # what the kernel wrapper must handle
    model = DeepseekV3ForCausalLM(config).train()
    ids, positions = _packed_rows(config.vocab_size)

    model.set_attn_implementation("sdpa")
    assert isinstance(model.attention_layout(positions), torch.Tensor)
    dense = _loss_and_grads(model, ids, positions)
    model.set_attn_implementation("varlen")
    assert isinstance(model.attention_layout(positions), PackedSamples)
    varlen = _loss_and_grads(model, ids, positions)

    torch.testing.assert_close(varlen[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(varlen[1], dense[1], rtol=1e-5, atol=1e-5)
    assert varlen[2].keys() == dense[2].keys() and len(dense[2]) > 20
    # Summed losses of a large-init model: the tolerance is relative to each gradient's scale.
    for name, grad in dense[2].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(varlen[2][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_varlen_keeps_samples_apart():
    """Guard for the equality above: each packed sample's logits are those of the sample run alone."""
    model = DeepseekV3ForCausalLM(tiny_config(), attn_implementation="varlen").eval()
    ids, positions = _packed_rows(model.config.vocab_size)
    with torch.no_grad():
        packed = model(ids, position_ids=positions).logits
        start = 0
        for length in SAMPLE_LENGTHS[0]:
            alone = model(ids[:1, start : start + length]).logits
            torch.testing.assert_close(packed[:1, start : start + length], alone, rtol=1e-5, atol=1e-5)
            start += length
        # Attending across the boundary instead changes the later samples.
        assert (packed[:1, 7:] - model(ids[:1]).logits[:, 7:]).abs().max() > 1e-3


def test_offsets_from_the_loader_are_used_as_given(monkeypatch):
    """The SFT step's path (collate_packs gives cu_seqlens): the same logits as offsets found from the position
    ids, and no search for them on the device (which costs a GPU→host sync per forward)."""
    model = DeepseekV3ForCausalLM(tiny_config(), attn_implementation="varlen").eval()
    ids, positions = _packed_rows(model.config.vocab_size)
    offsets, _ = cu_seqlens_from_position_ids(positions)
    with torch.no_grad():
        found = model(ids, position_ids=positions).logits

        def refuse(_positions):
            raise AssertionError("offsets searched on the device although the loader gave them")

        monkeypatch.setattr(attention, "_sample_offsets", refuse)
        given = model(ids, position_ids=positions, cu_seqlens=offsets).logits
        through_policy = Policy(model)(ids, positions, cu_seqlens=offsets).logits
    torch.testing.assert_close(given, found, rtol=0, atol=0)
    torch.testing.assert_close(through_policy, found, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="searched on the device"):  # the guard above can fail
        model(ids, position_ids=positions)


def test_selection_of_the_attention_path():
    model = DeepseekV3ForCausalLM(tiny_config())
    _, positions = _packed_rows(model.config.vocab_size)
    assert model.attn_implementation == "auto"
    assert isinstance(model.attention_layout(positions), PackedSamples)  # auto: per-sample, CPU included
    model.set_attn_implementation("varlen")
    padding = torch.ones_like(positions)
    padding[0, -2:] = 0
    assert isinstance(model.attention_layout(positions, padding), torch.Tensor)  # padding keys need the mask
    assert isinstance(model.attention_layout(positions, torch.ones_like(positions)), PackedSamples)
    with pytest.raises(ValueError, match="attn_implementation='eager'.*auto, sdpa, varlen"):
        model.set_attn_implementation("eager")


def _one_head_dim_kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
    """Stands in for FlashAttention's varlen kernel on CPU, with its contract: one head dim for q, k and v,
    causal only through the arguments, the default scale 1/sqrt(d) unless `scale` is given."""
    assert q.shape[-1] == k.shape[-1] == v.shape[-1], "the kernel takes a single head dim"
    assert torch.equal(cu_q, cu_k) and max_q == max_k == int(cu_q.diff().max())
    assert kwargs.get("window_size") == (-1, 0) or kwargs.get("is_causal") is True
    scale = kwargs.get("scale", q.shape[-1] ** -0.5)
    return attention._per_sample_sdpa(q, k, v, cu_q, scale)


@pytest.mark.parametrize("kernel_params", ["torch_2_13", "torch_2_10"])
def test_flash_wrapper_pads_v_and_passes_the_scale(monkeypatch, kernel_params):
    monkeypatch.setattr(attention, "varlen_attn", _one_head_dim_kernel)
    if kernel_params == "torch_2_10":  # no `scale` argument: the wrapper folds the scale into q
        monkeypatch.setattr(attention, "_VARLEN_PARAMS", frozenset({"is_causal", "return_aux"}))
    cu_seqlens, longest = cu_seqlens_from_position_ids(_packed_rows(10)[1])
    tokens, heads = int(cu_seqlens[-1]), 4
    q, k = (torch.randn(tokens, heads, 24, requires_grad=True) for _ in range(2))
    v = torch.randn(tokens, heads, 16, requires_grad=True)
    scale = 0.37  # not 1/sqrt(24), as under YaRN
    got = attention._flash_varlen(q, k, v, cu_seqlens, longest, scale)
    expected = attention._per_sample_sdpa(q, k, v, cu_seqlens, scale)
    assert got.shape == (tokens, heads, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_hidden_only_skips_the_head_and_keeps_the_numbers():
    """The trainers' fused head + loss path: no [B, L, V] logits, the same hidden states and MTP logits."""
    model = DeepseekV3ForCausalLM(tiny_config(), attn_implementation="varlen").eval()
    ids, positions = _packed_rows(model.config.vocab_size)
    with torch.no_grad():
        full = Policy(model)(ids, positions, with_mtp=True)
        fused = Policy(model)(ids, positions, with_mtp=True, hidden_only=True)
        assert model(ids, position_ids=positions, return_logits=False).logits is None
    assert fused.logits is None and fused.head_weight is model.lm_head.weight
    torch.testing.assert_close(fused.hidden @ fused.head_weight.T, full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.mtp_logits[0], full.mtp_logits[0])
