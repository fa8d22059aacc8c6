"""bench/sft_scaling.py on CPU: the tiny model trained by 1 process and by 2 gloo processes (DDP through
`accelerate launch`) at the same global batch takes the same steps — losses and gradient norms equal to fp32
rounding. Wrong loss normalisation (per-rank counts, DDP's average not undone) changes the gradient norms; wrong
data sharding changes the packs' token checksums and stops the 2-process run at its step-0 check.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest


def _bench(repo_root):
    if "sft_scaling" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sft_scaling", repo_root / "bench" / "sft_scaling.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["sft_scaling"] = module
        spec.loader.exec_module(module)
    return sys.modules["sft_scaling"]


@pytest.mark.slow
def test_two_gloo_processes_take_the_steps_of_one(repo_root, tmp_path):
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--lr",
        "1e-2",
        "--out",
        str(tmp_path),
    ]
    results = _bench(repo_root).main(argv)
    one, two = results["sections"]["1_process"], results["sections"]["2_processes_ddp"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["distributed_type"] == "MULTI_CPU" and two["packs_per_rank"] == 2
    assert one["micro_batches_per_rank"] == 2  # 1 process accumulates the 2 micro-batches the 2 ranks run
    assert one["token_checksums"] == two["token_checksums"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    assert one["losses"][-1] < one["losses"][0]  # it trains
    assert results["agreement"]["ddp"]["agree"] and results["scaling_efficiency"]["ddp"] > 0
    markdown = (tmp_path / "sft_scaling.md").read_text()
    assert "| 2_processes_ddp | 2 |" in markdown and (tmp_path / "sft_scaling.json").exists()


def test_runs_that_need_more_gpus_than_the_host_has_are_skipped(repo_root, tmp_path, monkeypatch):
    """On a 1-GPU host the 1-process run is launched and each 2-process run is recorded as skipped, with the
    reason, in the results and the table (no launch, no crash)."""
    bench = _bench(repo_root)
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 1)
    launched = []

    def fake_launch(args, name, processes, strategy, results, expect):
        launched.append((name, processes, expect))
        return {
            "processes": 1, "tokens_per_s": 1000.0, "step_s": 0.5, "model_tflops_per_gpu": 100.0,
            "mfu_vs_989": 0.1, "mfu_vs_770": 0.13, "peak_gib_per_gpu": [20.0], "losses": [12.0, 11.5],
            "env": {"gpu": "test GPU"},
        }  # fmt: skip

    monkeypatch.setattr(bench, "launch", fake_launch)
    argv = ["--device", "cuda", "--strategy", "ddp", "fsdp2", "--out", str(tmp_path)]
    results = bench.main(argv)
    assert launched == [("1_process", 1, None)]
    for strategy in ("ddp", "fsdp2"):
        assert results["sections"][f"2_processes_{strategy}"] == {"skipped": "needs 2 GPUs, found 1"}
    assert results["gpus_visible"] == 1 and results["scaling_efficiency"] == {} and results["agreement"] == {}
    assert bench.missing_gpus("cuda", 1) is None and bench.missing_gpus("cpu", 2) is None
    markdown = (tmp_path / "sft_scaling.md").read_text()
    assert (
        "| 2_processes_ddp | needs 2 GPUs, found 1 |" in markdown and "| 1_process | 1 | 1,000 |" in markdown
    )
