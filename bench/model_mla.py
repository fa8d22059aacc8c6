"""MLA decoding: absorbed attention over the 576-wide latent cache vs the naive per-head K/V cache (GPU, bf16).

    python bench/model_mla.py [--batch 8] [--contexts 4096,32768] [--iters 20]

One V3-sized attention layer (128 heads, d_c 512, d_h^R 64, q_lora 1536, hidden 7168) decodes one token per
sequence at the given context length.
- absorbed: `MultiHeadLatentAttention.forward_absorbed`: caches c_KV + k^R (576 numbers/token), attends in
  latent space with W_UK folded into the query and W_UV applied after;
- naive: the standard implementation without absorption: per-head K [.., 192] and V [.., 128] cached
  (40,960 numbers/token) and one SDPA call.
Target: absorbed >= 2x faster at 32k.
"""

import argparse

import torch
import torch.nn.functional as F
from model_timing import graph_median_ms, median_ms

from posttrain.model import DeepseekV3Config, LatentKVCache
from posttrain.model.mla import CacheStep, MultiHeadLatentAttention
from posttrain.model.rope import RotaryEmbedding


def naive_step(attn, x, rope, k_cache, v_cache, position):
    """Decode one token per row with a per-head K/V cache [B, H, T, d]: project, append, attend."""
    q_nope, q_rope = attn._queries(x, *rope)
    c_kv, k_rope = attn._latents(x, *rope)
    kv = attn.kv_b_proj(c_kv).view(x.shape[0], 1, attn.num_heads, -1)
    k_nope, v = kv.split([attn.nope_dim, attn.v_dim], dim=-1)
    k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, attn.num_heads, -1)], dim=-1)
    k_cache[:, :, position] = k[:, 0]
    v_cache[:, :, position] = v[:, 0]
    q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q, k_cache[:, :, : position + 1], v_cache[:, :, : position + 1], scale=attn.softmax_scale
    )
    return attn.o_proj(out.transpose(1, 2).flatten(2))


def measure(attn, rotary, config, batch, context, iters):
    """One decode step at `context`: (context, absorbed/naive ms eager, absorbed/naive ms graphed, latent bytes,
    K/V bytes, relative difference of the two outputs)."""
    heads, position = config.num_attention_heads, context - 1  # the new token is the context-th one
    x = torch.randn(batch, 1, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    rope = rotary(torch.full((batch, 1), position, device="cuda"))

    # Fill both caches with the same past: random hidden states through the layer's own projections.
    cache = LatentKVCache(1, batch, config, torch.bfloat16, "cuda", capacity=context)
    k_cache = torch.empty(batch, heads, context, config.qk_head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.empty(batch, heads, context, config.v_head_dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for start in range(0, position, 4096):
            end = min(start + 4096, position)
            past = torch.randn(batch, end - start, config.hidden_size, device="cuda", dtype=torch.bfloat16)
            pos = torch.arange(start, end, device="cuda").expand(batch, -1)
            c_kv, k_rope = attn._latents(past, *rotary(pos))
            cache.c_kv[0, :, start:end], cache.k_rope[0, :, start:end] = c_kv, k_rope
            kv = attn.kv_b_proj(c_kv).view(batch, end - start, heads, -1)
            k_nope, v = kv.split([config.qk_nope_head_dim, config.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, heads, -1)], dim=-1)
            k_cache[:, :, start:end], v_cache[:, :, start:end] = k.transpose(1, 2), v.transpose(1, 2)
    positions = torch.full((batch, 1), position, device="cuda")
    key_mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device="cuda")
    step = CacheStep(cache, 0, positions, key_mask)

    with torch.no_grad():
        absorbed_out = attn.forward_absorbed(x, *rope, step)
        naive_out = naive_step(attn, x, rope, k_cache, v_cache, position)
        rel = ((absorbed_out.float() - naive_out.float()).norm() / naive_out.float().norm()).item()
        times = []
        for timer in (median_ms, graph_median_ms):
            times.append(timer(lambda: attn.forward_absorbed(x, *rope, step), iters))
            times.append(timer(lambda: naive_step(attn, x, rope, k_cache, v_cache, position), iters))
    return context, *times, cache.nbytes(), k_cache.nbytes + v_cache.nbytes, rel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--contexts", default="4096,32768")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    config = DeepseekV3Config(num_hidden_layers=1, max_position_embeddings=163840)
    attn = MultiHeadLatentAttention(config).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    rotary = RotaryEmbedding(config)
    rows = [measure(attn, rotary, config, args.batch, int(c), args.iters) for c in args.contexts.split(",")]
    print(
        f"batch {args.batch}, one V3 attention layer, bf16; eager = launched op by op, graph = CUDA-graph replay"
    )
    print(
        f"{'context':>8s} {'absorbed':>9s} {'naive':>8s} {'speedup':>8s} {'absorbed':>9s} {'naive':>8s} "
        f"{'speedup':>8s} {'latent MB':>10s} {'K/V MB':>9s} {'rel diff':>9s}"
    )
    print(f"{'':8s} {'eager ms':>9s} {'eager ms':>8s} {'':8s} {'graph ms':>9s} {'graph ms':>8s}")
    for context, a_eager, n_eager, a_graph, n_graph, latent, kv, rel in rows:
        print(
            f"{context:8d} {a_eager:9.3f} {n_eager:8.3f} {n_eager / a_eager:7.2f}x {a_graph:9.3f} {n_graph:8.3f} "
            f"{n_graph / a_graph:7.2f}x {latent / 2**20:10.1f} {kv / 2**20:9.1f} {rel:9.1e}"
        )


if __name__ == "__main__":
    main()
