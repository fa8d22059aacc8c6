"""FP8 inside compiled blocks: a Llama-3.2-1B MLP block (RMSNorm → gate/up → SwiGLU → down → residual), forward and
backward under bf16 autocast over fp32 master weights, as the SFT trainer runs it.

    python bench/fp8_block_gpu.py --out results      # CUDA; --device cpu --tokens 256 --hidden 256 for a smoke run

Three ways: bf16 `nn.Linear` compiled, `FP8Linear` compiled (each activation and gradient quantised by one Triton
pass for both of its tilings, the FP8 GEMMs one custom operator in the graph, the weights quantised once per
optimiser step by the block's pre-hook, as the trainers set it up), and `FP8Linear` eager. Asserted before timing:
against the same block in fp32 (eager, no autocast), the compiled FP8 block's output and gradients are as accurate
as the eager FP8 block's (within 25%: Inductor rounds some intermediates differently), and no graph break. Timed:
median ms per forward+backward. Profiled: the compiled FP8 block's GPU kernels, summed by name. Writes
<out>/fp8_block.json.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# bench/ itself is not put on sys.path (bench/sandbox.py would shadow the `sandbox` package): the harness by path.
_spec = importlib.util.spec_from_file_location(
    "gpu_harness", Path(__file__).resolve().parent / "gpu_harness.py"
)
gpu_harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_harness)

from posttrain.model.fp8_linear import FP8Linear, convert_to_fp8, refresh_quantized_weights_before  # noqa: E402


class MLPBlock(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=1e-5)
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def fwd_bwd(
    block: nn.Module, x: torch.Tensor, device: torch.device, autocast: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
        y = block(x)
    y.float().square().mean().backward()
    return y.detach().float(), [x.grad.float()] + [p.grad.float() for p in block.parameters()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def kernel_table(block: nn.Module, x: torch.Tensor, device: torch.device) -> list[dict]:
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fwd_bwd(block, x, device)
        torch.cuda.synchronize()
    rows = [
        {"kernel": e.key[:120], "calls_per_step": e.count / 2, "ms_per_step": e.device_time_total / 2e3}
        for e in prof.key_averages()
        if e.device_time_total > 0
    ]
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:25]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device(args.device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"  # CPU: the trace, without Inductor's C++
    torch.manual_seed(0)
    bf16 = MLPBlock(args.hidden, args.ffn).to(device)
    fp8_eager = copy.deepcopy(bf16)
    assert len(convert_to_fp8(fp8_eager)) == 3
    assert isinstance(fp8_eager.down_proj, FP8Linear)
    # As the trainers compile a decoder block: its forward, with FP8 weights refreshed by a pre-hook.
    fp8_compiled, bf16_compiled = copy.deepcopy(fp8_eager), copy.deepcopy(bf16)
    refresh_quantized_weights_before(fp8_compiled)
    for block in (fp8_compiled, bf16_compiled):
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
    x = torch.randn(args.tokens, args.hidden, device=device)

    from torch._dynamo.utils import counters

    counters.clear()
    exact = fwd_bwd(copy.deepcopy(bf16), x, device, autocast=False)  # fp32 weights and math, eager
    runs = {
        "bf16_compiled": fwd_bwd(bf16_compiled, x, device),
        "fp8_eager": fwd_bwd(fp8_eager, x, device),
        "fp8_compiled": fwd_bwd(fp8_compiled, x, device),
    }
    names = ["y", "x", "norm.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    error_vs_fp32 = {
        run: {n: rel(a, b) for n, a, b in zip(names, [y, *grads], [exact[0], *exact[1]])}
        for run, (y, grads) in runs.items()
    }
    check = {"graph_breaks": sum(counters["graph_break"].values()), "error_vs_fp32": error_vs_fp32}
    print(json.dumps(check, indent=1))
    assert check["graph_breaks"] == 0, dict(counters["graph_break"])
    for n in names:  # the compiled block is as accurate as the eager FP8 block (both round to e4m3 per tile)
        assert error_vs_fp32["fp8_compiled"][n] <= 1.25 * error_vs_fp32["fp8_eager"][n] + 1e-3, (n, check)
        assert error_vs_fp32["fp8_compiled"][n] < 0.12, (n, check)

    timings = {
        name: gpu_harness.median_ms(lambda b=block: fwd_bwd(b, x, device), device, args.iters)
        for name, block in (
            ("bf16_compiled", bf16_compiled),
            ("fp8_compiled", fp8_compiled),
            ("fp8_eager", fp8_eager),
        )
    }
    flops = 6 * args.tokens * 3 * args.hidden * args.ffn
    result = {
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "check": check,
        "ms_fwd_bwd": timings,
        "gemm_tflops_equivalent": {k: flops / (v * 1e9) for k, v in timings.items()},
        "fp8_compiled_speedup_vs_bf16_compiled": timings["bf16_compiled"] / timings["fp8_compiled"],
        "kernels_fp8_compiled": kernel_table(fp8_compiled, x, device),
        "kernels_bf16_compiled": kernel_table(bf16_compiled, x, device),
    }
    print(
        json.dumps({k: result[k] for k in ("ms_fwd_bwd", "fp8_compiled_speedup_vs_bf16_compiled")}, indent=1)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_block.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
