"""DeepSeekMoE layer time vs its grouped-GEMM ceiling and vs a per-expert loop (GPU, bf16).

    python bench/model_moe.py [--tokens-v3 8192] [--tokens-moonlight 16384] [--iters 10] [--profile]

Ceiling: only the layer's unavoidable GEMMs, i.e. the two `torch._grouped_mm` calls over the same
expert-sorted rows plus the shared expert's three matmuls. ratio = ceiling time / layer time (target >= 0.8);
what the ratio misses is routing (an fp32 router GEMM, top-k, sort), the gather/un-permute and the gate-weighted
sum. "loop" is the same layer with one matmul per expert (`expert_loop_linear`). "train" = forward + backward.
`--profile` adds, per shape, the GPU time of the training step split by kernel (torch profiler): where the time
beyond the ceiling goes.
"""

import argparse

import torch
import torch.nn.functional as F
from model_timing import median_ms

from posttrain.model import DeepseekV3Config
from posttrain.model.moe import DeepSeekMoE, expert_loop_linear, grouped_linear

SHAPES = {
    "v3": dict(
        hidden_size=7168,
        moe_intermediate_size=2048,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
    ),
    "moonlight": dict(
        hidden_size=2048,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        n_shared_experts=2,
    ),
}


def build(shape):
    config = DeepseekV3Config(
        num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0, **SHAPES[shape]
    )
    moe = DeepSeekMoE(config).cuda().to(torch.bfloat16)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    return moe


def ceiling_fn(moe, x, train):
    """The layer's GEMMs alone, on rows already sorted by expert (as the layer's own routing sorts them)."""
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        _, indices, _ = moe.gate(flat)
        order = indices.flatten().argsort(stable=True)
        offsets = torch.bincount(indices.flatten(), minlength=moe.config.n_routed_experts).cumsum(0).int()
        rows = flat[order // indices.shape[1]].clone()
    experts, shared = moe.experts, moe.shared_experts

    def gemms():
        gate, up = grouped_linear(rows, experts.gate_up_proj, offsets).chunk(2, dim=-1)
        routed = grouped_linear(F.silu(gate) * up, experts.down_proj, offsets)
        return routed, shared(flat)

    def run():
        if not train:
            with torch.no_grad():
                return gemms()
        moe.zero_grad(set_to_none=True)
        routed, dense = gemms()
        torch.autograd.backward([routed, dense], [torch.ones_like(routed), torch.ones_like(dense)])

    return run


def layer_fn(moe, x, train):
    def run():
        if not train:
            with torch.no_grad():
                return moe(x)
        moe.zero_grad(set_to_none=True)
        out, _ = moe(x)
        out.backward(torch.ones_like(out))

    return run


def flops(moe, tokens, train):
    c = moe.config
    routed = 2 * tokens * c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size
    shared = 2 * tokens * 3 * c.hidden_size * c.moe_intermediate_size * c.n_shared_experts
    return (routed + shared) * (3 if train else 1)


def profile_split(moe, x, iters: int = 5) -> None:
    """The layer's forward+backward GPU time per kernel, largest first (CUDA kernels only)."""
    from torch.profiler import ProfilerActivity, profile

    run = layer_fn(moe.train(), x, True)
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    print(f"  profile: {total / iters / 1e3:.2f} ms GPU per forward+backward")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        share = e.self_device_time_total / total
        print(
            f"    {share:6.1%} {e.self_device_time_total / iters / 1e3:7.3f} ms  {e.count // iters:3d}x  {e.key[:90]}"
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens-v3", type=int, default=8192)
    parser.add_argument("--tokens-moonlight", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="kernel split of the training step per shape")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = []
    for shape, tokens in (("moonlight", args.tokens_moonlight), ("v3", args.tokens_v3)):
        moe = build(shape)
        x = torch.randn(1, tokens, moe.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            grouped_out = moe.eval()(x)[0]
            moe.experts.linear = expert_loop_linear
            loop_out = moe(x)[0]
            moe.experts.linear = grouped_linear
        rel = ((grouped_out.float() - loop_out.float()).norm() / loop_out.float().norm()).item()
        for train in (False, True):
            moe.train(train)
            layer = median_ms(layer_fn(moe, x, train), args.iters)
            ceiling = median_ms(ceiling_fn(moe, x, train), args.iters)
            moe.experts.linear = expert_loop_linear
            loop = median_ms(layer_fn(moe, x, train), max(3, args.iters // 2))
            moe.experts.linear = grouped_linear
            tflops = flops(moe, tokens, train) / layer / 1e9
            rows.append(
                (
                    shape,
                    tokens,
                    "train" if train else "fwd",
                    layer,
                    ceiling,
                    ceiling / layer,
                    loop,
                    loop / layer,
                    tflops,
                    rel,
                )
            )
        if args.profile:
            print(f"{shape}, {tokens} tokens:")
            profile_split(moe, x)
        del moe, x
        torch.cuda.empty_cache()
    print(
        f"{'shape':10s} {'tokens':>6s} {'mode':5s} {'layer ms':>9s} {'ceiling':>8s} {'ratio':>6s} {'loop ms':>8s} {'vs loop':>7s} {'TFLOP/s':>8s} {'rel err':>8s}"
    )
    for r in rows:
        print(
            f"{r[0]:10s} {r[1]:6d} {r[2]:5s} {r[3]:9.3f} {r[4]:8.3f} {r[5]:6.2f} {r[6]:8.3f} {r[7]:6.2f}x {r[8]:8.1f} {r[9]:8.1e}"
        )


if __name__ == "__main__":
    main()
