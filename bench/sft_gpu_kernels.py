"""Micro-benchmarks of bench/sft_gpu.py: the loss through the output head (plain, chunked, the fused Triton
kernel, Liger) for SFT's cross-entropy and GRPO's log-probs + entropy, each checked against a float32
computation of the same function, and attention over one packed micro-batch (sdpa with a dense mask, varlen,
flex)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from gpu_harness import batch_tensors, cleanup, median_ms, peak_gib

from posttrain.algorithms.sft import token_cross_entropy_sum
from posttrain.fast.attention import packed_attention_kwargs
from posttrain.fast.chunked_loss import chunked_token_cross_entropy_sum, chunked_token_logprobs


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


def _time_impls(
    impls: dict[str, Callable[[], torch.Tensor]],
    reference: Callable[[], torch.Tensor],
    leaves: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
) -> dict[str, Any]:
    """Forward + backward of each implementation under bf16 autocast: median ms, peak memory, and the relative
    difference of its value and gradients from `reference` run in float32 (no autocast)."""
    hidden, weight = leaves
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(fn: Callable[[], torch.Tensor], cast: bool = True) -> torch.Tensor:
        hidden.grad = weight.grad = None
        with torch.autocast(device.type, enabled=False) if not cast else autocast:
            value = fn()
        value.backward()
        return value.detach()

    cleanup()
    want = run(reference, cast=False).float()
    want_grads = (hidden.grad.float().clone(), weight.grad.float().clone())
    out: dict[str, Any] = {}
    for name, fn in impls.items():
        try:
            cleanup()
            value = run(fn)
            diffs = {
                "value_rel_diff_vs_fp32": _rel(value, want),
                "grad_hidden_rel_diff_vs_fp32": _rel(hidden.grad, want_grads[0]),
                "grad_weight_rel_diff_vs_fp32": _rel(weight.grad, want_grads[1]),
            }
            cleanup()
            out[name] = {"fwd_bwd_ms": median_ms(lambda fn=fn: run(fn), device, iters=5, warmup=2)}
            out[name] |= {"peak_gib": peak_gib(device), **diffs}
        except Exception as error:  # noqa: BLE001 (liger may be missing: record and go on)
            out[name] = {"error": f"{type(error).__name__}: {error}"}
    return out


def bench_losses(ctx: dict[str, Any]) -> dict[str, Any]:
    """SFT's Σ CE and GRPO's per-token log-prob + entropy (with random upstream gradients) over one step's
    tokens at the model's vocab."""
    device, cfg = ctx["device"], ctx["cfg"]
    n = ctx["batch"] * ctx["packs"].capacity
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(n, cfg["hidden_size"], device=device, generator=g).requires_grad_()
    weight = (
        torch.randn(cfg["vocab_size"], cfg["hidden_size"], device=device, generator=g) * 0.02
    ).requires_grad_()
    targets = torch.randint(0, cfg["vocab_size"], (n,), device=device, generator=g)
    targets[::50] = -100

    def plain() -> torch.Tensor:
        return token_cross_entropy_sum(torch.nn.functional.linear(hidden, weight), targets)[0]

    def chunked(impl: str, chunk: int) -> torch.Tensor:
        return chunked_token_cross_entropy_sum(hidden, weight, targets, chunk, impl)[0]

    impls = {"plain": plain, "liger": lambda: chunked("liger", 4096)}
    for chunk in (4096, 8192):
        impls[f"chunked_{chunk}"] = lambda c=chunk: chunked("chunked", c)
        impls[f"fused_{chunk}"] = lambda c=chunk: chunked("fused", c)
    result: dict[str, Any] = {
        "tokens": n,
        "cross_entropy": _time_impls(impls, plain, (hidden, weight), device),
    }

    scored = targets.clamp_min(0)
    g_logp, g_entropy = (torch.randn(n, device=device, generator=g) for _ in range(2))

    def logprobs(impl: str) -> torch.Tensor:
        logp, entropy = chunked_token_logprobs(hidden, weight, scored, 1.0, 4096, impl)
        return (logp * g_logp).sum() + (entropy * g_entropy).sum()

    result["logprobs_entropy"] = _time_impls(
        {"chunked_4096": lambda: logprobs("chunked"), "fused_4096": lambda: logprobs("fused")},
        lambda: logprobs("chunked"),
        (hidden, weight),
        device,
    )
    return result


def bench_attention(ctx: dict[str, Any]) -> dict[str, Any]:
    """One layer's attention, forward + backward, over the first micro-batch's packed samples."""
    from posttrain.fast.attention import cu_seqlens_from_position_ids, varlen_attention

    device, cfg = ctx["device"], ctx["cfg"]
    batch = batch_tensors(ctx["packs"].dataset(0), range(ctx["batch"]), device)
    heads, kv_heads, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    b, s = batch["input_ids"].shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device).manual_seed(1)
    q = torch.randn(b, heads, s, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(b, kv_heads, s, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(b, kv_heads, s, dim, device=device, dtype=dtype, generator=g).requires_grad_()
    cu_seqlens, _ = cu_seqlens_from_position_ids(batch["position_ids"])
    sample = torch.repeat_interleave(
        torch.arange(len(cu_seqlens) - 1, device=device), cu_seqlens.diff().long()
    )
    sample = sample.view(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    dense = (sample[:, :, None] == sample[:, None, :]) & causal  # [B, S, S], what sdpa's packed path builds
    kwargs = packed_attention_kwargs(batch["position_ids"])

    def sdpa_masked() -> torch.Tensor:  # as transformers' sdpa path: KV heads repeated, a boolean mask
        groups = heads // kv_heads
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=dense[:, None]
        ).transpose(1, 2)

    def varlen() -> torch.Tensor:
        return varlen_attention(None, q, k, v, None, **kwargs)[0]

    impls = {"sdpa_dense_mask": sdpa_masked, "varlen": varlen}
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def same_sample(b_, h_, q_idx, kv_idx):  # noqa: ANN001, ANN202
            return (sample[b_, q_idx] == sample[b_, kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(same_sample, b, None, s, s, device=device)
        compiled = torch.compile(flex_attention)

        def flex() -> torch.Tensor:
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

        impls["flex_attention"] = flex
    flops = 12 * heads * dim * sum(n * (n + 1) / 2 for n in cu_seqlens.diff().tolist())  # fwd + bwd, causal
    out: dict[str, Any] = {"tokens": b * s, "samples": len(cu_seqlens) - 1}
    reference = None
    grad_out = torch.randn(b, s, heads, dim, device=device, dtype=dtype, generator=g)
    for name, fn in impls.items():

        def step(fn=fn) -> torch.Tensor:
            q.grad = k.grad = v.grad = None
            result = fn()
            result.backward(grad_out)
            return result

        try:
            result = step().float()
            reference = result if reference is None else reference
            ms = median_ms(step, device, iters=5, warmup=2)
            out[name] = {
                "fwd_bwd_ms": ms,
                "tflops": flops / ms / 1e9,
                "rel_diff_vs_sdpa": float((result - reference).norm() / reference.norm()),
            }
        except Exception as error:  # noqa: BLE001
            out[name] = {"error": f"{type(error).__name__}: {error}"}
    return out
