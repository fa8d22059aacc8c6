"""The GPU benchmarks' code paths on a tiny model on CPU (fp32): posttrain's fast SFT and GRPO steps give TRL's
losses (and, for GRPO, TRL's gradient norms) step by step on the same packs and batch, TRL attending through the
same varlen kernel (packed rows for SFT, padded rows unpadded by the mask for GRPO).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

pytest.importorskip("trl")


def _bench(name: str, repo_root):
    if name not in sys.modules:  # grpo_gpu imports sft_gpu by name, as when run as a script
        spec = importlib.util.spec_from_file_location(name, repo_root / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.slow
def test_sft_bench_fast_path_gives_trl_losses(repo_root, tmp_path):
    results = _bench("sft_gpu", repo_root).main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--profile-steps",
            "1",
            "--out",
            str(tmp_path),
        ]
        + ["--only", "posttrain_eager_chunked", "trl_varlen"]
    )
    sections = results["sections"]
    assert sections["trl_varlen"]["same_packs_as_posttrain"]
    assert results["loss_agreement"]["vs"] == "trl_varlen"
    agreement = results["loss_agreement"]["per_run"]["posttrain_eager_chunked"]
    assert agreement["steps"] == 3 and agreement["max_rel_diff"] < 1e-5
    assert sections["posttrain_eager_chunked"]["tokens_per_s"] > 0
    assert results["speedup"]["trl_best"] == "trl_varlen"
    rows = (tmp_path / "sft_gpu.md").read_text().splitlines()
    assert sum(row.startswith("| posttrain_eager_chunked | ") for row in rows) == 1  # its throughput row


@pytest.mark.slow
def test_grpo_bench_fast_path_gives_trl_losses_and_gradients(repo_root, tmp_path):
    results = _bench("grpo_gpu", repo_root).main(
        ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--prompts", "2", "--group", "4"]
        + ["--micro", "4", "--out", str(tmp_path), "--only", "posttrain_fast", "trl_unpad"]
    )
    assert results["batch"]["posttrain_packs"] < results["batch"]["sequences"]  # packed, not one row each
    assert results["speedup_vs_trl"]["trl_best"] == "trl_unpad"  # TRL's padded rows through the unpad kernel
    agreement = results["agreement_vs_trl"]["posttrain_fast"]
    assert agreement["loss_max_abs_rel"] < 1e-5 and agreement["grad_norm_max_rel"] < 1e-5


@pytest.mark.slow
def test_moe_bench_fp8_run_tracks_the_bf16_run(repo_root, tmp_path):
    results = _bench("moe_gpu", repo_root).main(
        ["--tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--profile-steps", "1"]
        + ["--out", str(tmp_path), "--only", "posttrain", "posttrain_fp8"]
    )
    sections = results["sections"]
    assert "parity_step0" not in sections and "transformers" not in sections  # not asked for
    assert sections["posttrain_fp8"]["tokens_per_s"] > 0
    # the same packs from the same weights: FP8's quantisation error moves the losses only slightly
    agreement = results["fp8_speedup"]["main_loss"]
    assert agreement["steps"] == 3 and 0 < agreement["max_rel_diff"] < 1e-2
