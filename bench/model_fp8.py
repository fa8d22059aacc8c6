"""Block-scaled FP8 on a GPU: correctness of the Triton kernels against the PyTorch reference, then speed.

    python bench/model_fp8.py            # needs CUDA and Triton; prints tables, writes --out/fp8_bench.json

1. Correctness (asserted before anything is timed): the quantisation kernel is bit-identical to the
   reference for every tiling; the GEMM kernel agrees with the reference (dequantise, float32 matmul) to the
   rounding of the tensor cores' in-block accumulation; FP8Linear's forward and backward on the GPU agree
   with the same layer run through the reference path.
2. GEMM throughput, TFLOP/s (2·M·N·K / median time): bf16 torch.matmul, `fp8_block_matmul` as dispatched
   (cuBLAS block-scaled `torch._scaled_mm` where its self-check passes, else Triton), our Triton kernel alone,
   the dispatched GEMM plus quantising the activation (what an FP8 inference linear costs), and
   torch._scaled_mm with one scale per tensor (the FP8 ceiling).
3. Quantisation cost, and FP8Linear (bf16 master weight) forward+backward vs bf16 nn.Linear.
"""

import argparse
import json
import os
import statistics

import torch
import triton
from triton.testing import do_bench

from posttrain.model import fp8 as fp8_module
from posttrain.model.fp8 import (
    FP8_DTYPE,
    dequantize_blocks,
    fp8_block_matmul,
    quantize_blocks,
    quantize_blocks_both_layouts,
    quantize_rows_and_columns,
)
from posttrain.model.fp8_linear import FP8Linear
from posttrain.model.kernels.fp8 import _fp8_block_gemm_kernel, fp8_block_gemm

BF16 = torch.bfloat16

GEMM_SHAPES = {  # name: (M, N, K), C[M, N] = A[M, K] @ B[N, K].T
    "square 4096": (4096, 4096, 4096),
    "square 8192": (8192, 8192, 8192),
    "V3 7168->18432 (dense MLP up)": (4096, 18432, 7168),
    "V3 7168->2048 (expert up)": (4096, 2048, 7168),
    "V3 2048->7168 (expert down)": (4096, 7168, 2048),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


def reference_quantize(
    x: torch.Tensor, tile: tuple[int, int], transpose: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_blocks(x.cpu(), tile, transpose)  # CPU tensors take the PyTorch reference path
    return q.to(x.device), scale.to(x.device)


def check_quantisation() -> None:
    cases = [
        ((4096, 7168), (1, 128), False),
        ((2048, 7168), (128, 128), False),
        ((1000, 3000), (128, 1), True),
    ]
    cases += [((333, 1000), (1, 128), False), ((333, 1000), (128, 128), False), ((333, 1000), (128, 1), True)]
    for shape, tile, transpose in cases:
        magnitude = torch.rand(shape[0], 1, device="cuda") * 100
        x = (torch.randn(shape, device="cuda") * magnitude).to(torch.bfloat16)
        q, scale = quantize_blocks(x, tile, transpose)
        q_ref, scale_ref = reference_quantize(x, tile, transpose)
        assert torch.equal(scale, scale_ref), (shape, tile, "scales differ")
        mismatches = (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
        assert mismatches == 0, (shape, tile, f"{mismatches} e4m3 values differ")
    for shape in [(7168, 2048), (300, 1000)]:
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        q, scale, q_t, scale_t = quantize_blocks_both_layouts(w, (128, 128))
        q_ref, scale_ref = reference_quantize(w, (128, 128), False)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
        assert torch.equal(q_t.view(torch.uint8), q_ref.view(torch.uint8).t()) and torch.equal(
            scale_t, scale_ref.t()
        )
    for shape in [(8192, 2048), (4000, 8192), (333, 1000)]:  # an activation in both tilings, one pass
        x = (torch.randn(shape, device="cuda") * torch.rand(shape[0], 1, device="cuda") * 100).bfloat16()
        got = quantize_rows_and_columns(x)
        want = (*reference_quantize(x, (1, 128), False), *reference_quantize(x, (128, 1), True))
        for a, b in zip(got, want):
            same = (
                torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                if a.dtype == FP8_DTYPE
                else torch.equal(a, b)
            )
            assert same, (shape, "rows-and-columns quantisation differs from the reference")
        assert got[1].stride() == (1, shape[0]) and got[3].stride() == (1, shape[1])  # cuBLAS's scale layouts
    print(f"quantisation kernels: bit-identical to the reference on {len(cases) + 5} shapes/tilings/layouts")


def check_gemm() -> None:
    # Edges in M, N and K, the dgrad form (N > K) and the weight-gradient form (B scaled per row).
    shapes = [(4096, 2048, 7168, 128), (1200, 7168, 2048, 128), (333, 300, 1000, 128), (7168, 2048, 4096, 1)]
    for m, n, k, b_rows in shapes:
        a = torch.randn(m, k, device="cuda")
        b = torch.randn(n, k, device="cuda")
        a_q, a_scale = quantize_blocks(a, (1, 128))
        b_q, b_scale = quantize_blocks(b, (b_rows, 128))
        out = fp8_block_matmul(a_q, a_scale, b_q, b_scale, torch.float32)
        assert torch.isfinite(out).all()
        exact = (
            dequantize_blocks(a_q, a_scale, (1, 128)).double()
            @ dequantize_blocks(b_q, b_scale, (b_rows, 128)).double().T
        )
        vs_exact, vs_data = rel_err(out, exact), rel_err(out, a.double() @ b.double().T)
        print(
            f"gemm {m}x{n}x{k} b_scale_rows={b_rows}: vs float64 of FP8 operands {vs_exact:.2e}, vs float64 of data {vs_data:.4f}"
        )
        assert vs_exact < 1e-3 and vs_data < 0.05


def check_fp8_linear() -> None:
    torch.manual_seed(0)
    gpu = FP8Linear(7168, 2048, bias=True, dtype=torch.float32, device="cuda")
    cpu = FP8Linear(7168, 2048, bias=True, dtype=torch.float32)
    cpu.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    x = torch.randn(4, 300, 7168, device="cuda", requires_grad=True)
    g = torch.randn(4, 300, 2048, device="cuda")
    x_cpu = x.detach().cpu().requires_grad_()
    y, y_cpu = gpu(x), cpu(x_cpu)
    y.backward(g)
    y_cpu.backward(g.cpu())
    errs = {
        "y": rel_err(y, y_cpu),
        "dx": rel_err(x.grad, x_cpu.grad),
        "dW": rel_err(gpu.weight.grad, cpu.weight.grad),
        "db": rel_err(gpu.bias.grad, cpu.bias.grad),
    }
    print(
        "FP8Linear GPU (cuBLAS/Triton) vs CPU (reference):",
        ", ".join(f"{k} {v:.2e}" for k, v in errs.items()),
    )
    assert all(e < 1e-3 for e in errs.values()), errs


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / ms / 1e9


def bench_ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def bench_gemm(name: str, m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    x_q, x_scale = quantize_blocks(x, (1, 128))
    w_q, w_scale = quantize_blocks(w, (128, 128))
    one = torch.ones((), device="cuda")
    x_t8, w_t8 = x.to(FP8_DTYPE), w.to(FP8_DTYPE)
    row = {"name": name, "M": m, "N": n, "K": k}
    row["bf16 matmul"] = tflops(m, n, k, bench_ms(lambda: torch.matmul(x, w.t())))
    row["fp8 block gemm"] = tflops(m, n, k, bench_ms(lambda: fp8_block_matmul(x_q, x_scale, w_q, w_scale)))
    row["fp8 triton kernel"] = tflops(
        m, n, k, bench_ms(lambda: fp8_block_gemm(x_q, x_scale, w_q, w_scale, 128, 128, BF16))
    )
    row["config"] = str(_fp8_block_gemm_kernel.best_config)
    row["fp8 quant x + gemm"] = tflops(
        m, n, k, bench_ms(lambda: fp8_block_matmul(*quantize_blocks(x, (1, 128)), w_q, w_scale))
    )
    row["_scaled_mm tensor-wise"] = tflops(
        m,
        n,
        k,
        bench_ms(
            lambda: torch._scaled_mm(x_t8, w_t8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        ),
    )
    row["quant x ms"] = bench_ms(lambda: quantize_blocks(x, (1, 128)))
    row["quant W ms"] = bench_ms(lambda: quantize_blocks(w, (128, 128)))
    row["quant x GB/s"] = 3 * m * k / row["quant x ms"] / 1e6  # read bf16, write e4m3
    row["speedup"] = row["fp8 block gemm"] / row["bf16 matmul"]
    print(
        f"{name:32s} bf16 {row['bf16 matmul']:6.0f}  fp8 {row['fp8 block gemm']:6.0f}"
        f" (triton {row['fp8 triton kernel']:6.0f})  fp8+quant {row['fp8 quant x + gemm']:6.0f}"
        f"  scaled_mm tensor-wise {row['_scaled_mm tensor-wise']:6.0f}"
        f"  x{row['speedup']:.2f}  quant x {row['quant x ms']:.3f} ms ({row['quant x GB/s']:.0f} GB/s),"
        f" W {row['quant W ms']:.3f} ms",
        flush=True,
    )
    return row


def bench_training(name: str, m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    bf16 = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    fp8 = FP8Linear(k, n, dtype=torch.bfloat16, device="cuda")

    def step(layer: torch.nn.Module) -> None:
        layer(x).backward(g)

    times = {
        label: bench_ms(lambda layer=layer: step(layer)) for label, layer in (("bf16", bf16), ("fp8", fp8))
    }
    fwd = {label: bench_ms(lambda layer=layer: layer(x)) for label, layer in (("bf16", bf16), ("fp8", fp8))}
    flop = 3 * 2 * m * n * k
    row = {"name": name, "M": m, "N": n, "K": k}
    row.update({f"{label} fwd+bwd ms": t for label, t in times.items()})
    row.update({f"{label} fwd ms": t for label, t in fwd.items()})
    row["bf16 fwd+bwd TFLOP/s"] = flop / times["bf16"] / 1e9
    row["fp8 fwd+bwd TFLOP/s"] = flop / times["fp8"] / 1e9
    row["speedup"] = times["bf16"] / times["fp8"]
    print(
        f"{name:32s} fwd+bwd bf16 {times['bf16']:.3f} ms ({row['bf16 fwd+bwd TFLOP/s']:.0f} TFLOP/s)"
        f"  fp8 {times['fp8']:.3f} ms ({row['fp8 fwd+bwd TFLOP/s']:.0f})  x{row['speedup']:.2f}"
        f"  | fwd bf16 {fwd['bf16']:.3f} ms fp8 {fwd['fp8']:.3f} ms",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for fp8_bench.json")
    parser.add_argument("--checks-only", action="store_true", help="the correctness checks, no timing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/model_fp8.py needs a CUDA GPU (the CPU reference path is covered by tests/model)"
        )
    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True
    )
    check_quantisation()
    check_gemm()
    check_fp8_linear()
    routes = {
        f"{key[1]}-row B scales -> {key[2]}": ok for key, ok in fp8_module._CUBLAS_BLOCK_SCALING.items()
    }
    print(f"cuBLAS block-scaled GEMM self-check (True = used): {routes}", flush=True)
    if args.checks_only:
        return
    print("\nGEMM TFLOP/s (median); speedup = fp8 block gemm / bf16 matmul", flush=True)
    gemm_rows = []
    for name, shape in GEMM_SHAPES.items():
        gemm_rows.append(bench_gemm(name, *shape))
        save(args.out, gemm_rows, [])
    print("\nFP8Linear (bf16 master, all three GEMMs in FP8) vs bf16 nn.Linear, M=4096 tokens", flush=True)
    train_rows = [bench_training(name, *shape) for name, shape in list(GEMM_SHAPES.items())[2:]]
    geo = statistics.geometric_mean(r["speedup"] for r in gemm_rows)
    print(f"\ngeometric-mean GEMM speedup over bf16: x{geo:.2f} (target x1.3)")
    save(args.out, gemm_rows, train_rows)


def save(folder: str, gemm_rows: list[dict], train_rows: list[dict]) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "fp8_bench.json"), "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "cublas_block_scaling": {str(k): v for k, v in fp8_module._CUBLAS_BLOCK_SCALING.items()},
                "gemm": gemm_rows,
                "training": train_rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
