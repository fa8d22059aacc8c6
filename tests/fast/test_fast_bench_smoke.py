"""The GPU benchmarks' code paths on a tiny model on CPU (fp32): posttrain's fast SFT and GRPO steps give TRL's
losses (and, for GRPO, TRL's gradient norms) step by step on the same packs and batch, TRL attending through the
same varlen kernel (packed rows for SFT, padded rows unpadded by the mask for GRPO); the SmolLM2 chain runs TRL's
SFT and GRPO phases beside posttrain's.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

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


@pytest.mark.slow
def test_smollm2_chain_runs_trl_beside_posttrain(repo_root, tmp_path, tokenizer_dir):
    """bench/smollm2_chain.py's TRL phases on a tiny random Llama with SmolLM2's tokenizer: TRL's SFT from the
    base and TRL's GRPO from posttrain's cold start train, save a model that the chain scores like posttrain's,
    and leave their step times and logs in the record and the table."""
    config_dir = tmp_path / "config"
    shutil.copytree(tokenizer_dir, config_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    (config_dir / "config.json").write_text(json.dumps(config))
    runs, out = tmp_path / "runs", tmp_path / "out"
    subprocess.run(
        [
            sys.executable,
            str(repo_root / "bench" / "smollm2_chain.py"),
            "--tiny",
            "--init-config",
            str(config_dir),
        ]
        + ["--runs", str(runs), "--out", str(out), "--eval-prompts", "2"]
        + ["--phases", "base", "sft", "trl_sft", "trl_grpo"],
        cwd=repo_root,
        check=True,
    )
    record = json.loads((out / "chain.json").read_text())
    for phase in ("sft", "trl_sft", "trl_grpo"):
        assert record["phases"][phase]["status"] == "done", record["phases"][phase]
        assert record["evals"][phase]["n"] == 2
    for phase, logged in (("trl_sft", "loss"), ("trl_grpo", "rewards/math_accuracy/mean")):
        summary = json.loads((runs / phase / "trl_summary.json").read_text())
        assert summary["steps"] == 2 and len(summary["step_s"]) == 2 and summary["peak_gib"] is None  # CPU
        assert all(logged in entry for entry in summary["log"])
        assert record["phases"][phase]["s/step median"] > 0
    table = (out / "chain.md").read_text()
    assert "| the same cold start by TRL's SFTTrainer | **" in table
    assert "| posttrain's cold start + the same GRPO by TRL's GRPOTrainer | **" in table


def test_hf_decode_bench_compares_the_decoding_ways(repo_root, tmp_path):
    """bench/hf_decode_gpu.py on a tiny Qwen2 on CPU: every way decodes the same number of rows, and static
    decoding gives the growing-mask loop's greedy tokens."""
    from posttrain.generation.testing import build_tiny_qwen2

    model = build_tiny_qwen2(tmp_path / "model")
    results = _bench("hf_decode_gpu", repo_root).main(
        ["--model", str(model), "--prompts", "2", "--n", "2", "--max-tokens", "6", "--greedy-prompts", "3"]
        + ["--repeats", "1", "--out", str(tmp_path / "out")]
    )
    for way in ("dynamic", "static", "static_bf16_autocast") + (
        "transformers_generate",
        "transformers_generate_bf16_autocast",
    ):
        assert 0 < results[way]["tokens"] <= 2 * 2 * 6 and results[way]["s_per_call"] > 0
    assert results["greedy_agreement"] == {
        "same_tokens": 3,
        "of": 3,
        "max_logprob_diff": pytest.approx(0, abs=1e-5),
    }
    assert 0 <= results["bf16_autocast_greedy_agreement"]["same_tokens"] <= 3
    assert (tmp_path / "out" / "hf_decode.json").is_file()


def test_trl_runs_compile_only_when_asked(repo_root, tmp_path):
    from posttrain.config import TrainSection

    trl = _bench("smollm2_trl", repo_root)
    train = TrainSection(max_steps=3, lr=1e-5, min_lr=1e-5)
    assert trl.common_args(train, tmp_path)["torch_compile"] is False
    assert trl.common_args(
        train, tmp_path, trl.parse_args(["grpo", "r.yaml", "--torch-compile"]).torch_compile
    )["torch_compile"]


def test_fp8_block_bench_checks_the_compiled_block_against_fp32(repo_root, tmp_path):
    """bench/fp8_block_gpu.py on CPU (dynamo + AOTAutograd's trace, no Inductor): the FP8 MLP block compiles with no
    graph break, is as accurate as the eager FP8 block against fp32, and its results are written."""
    run = subprocess.run(
        [sys.executable, "bench/fp8_block_gpu.py", "--device", "cpu", "--tokens", "300", "--hidden", "256"]
        + ["--ffn", "384", "--iters", "1", "--out", str(tmp_path)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "fp8_block.json").read_text())
    assert result["check"]["graph_breaks"] == 0
    errors = result["check"]["error_vs_fp32"]
    # FP8 rounds each operand to e4m3 per tile: a few percent on the weight gradients, far above fp32's zero
    assert 0.01 < errors["fp8_compiled"]["gate_proj.weight"] < 0.12
    assert errors["fp8_compiled"] == pytest.approx(errors["fp8_eager"], rel=1e-6)  # same ops on CPU
