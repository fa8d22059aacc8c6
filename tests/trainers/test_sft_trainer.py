"""The SFT trainer end to end on CPU: it learns, accumulation and 2 processes equal one big batch, and a run
killed with SIGKILL resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config import SFTRecipe, load_recipe
from posttrain.trainers.sft import train_sft


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, repo_root) -> str:
    lines = (repo_root / "data" / "arith" / "sft.jsonl").read_text().splitlines()[:40]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_recipe(tmp_path: Path, data: str, repo_root: Path, name: str, **train) -> Path:
    recipe = {
        "model": {
            "from_config": str(repo_root / "recipes/models/tiny_qwen2.json"),
            "tokenizer": str(repo_root / "data/tokenizer"),
            "mtp": {"attach_depth": 0},
        },
        "data": {"train": [data], "max_seq_len": 256},
        "packing": {"capacity": 256},
        "train": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "seed": 1, **train},
        "logging": {"tensorboard": False, "progress": False},
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_in_process(path: Path) -> Path:
    return train_sft(load_recipe(path, SFTRecipe))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


@pytest.mark.slow
def test_trains_reports_and_saves_a_model_transformers_loads(tmp_path, small_data, repo_root):
    from transformers import AutoModelForCausalLM

    path = write_recipe(tmp_path, small_data, repo_root, "run", max_steps=30, micro_batch_size=2)
    model_dir = run_in_process(path)
    history = losses(model_dir.parent)
    assert len(history) == 30
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5, history
    assert (model_dir.parent / "report.png").stat().st_size > 10_000
    assert json.loads((model_dir.parent / "data_report.json").read_text())["used"] == 40
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trained = weights(model_dir)
    torch.testing.assert_close(model.model.embed_tokens.weight, trained["model.embed_tokens.weight"])


def test_four_micro_batches_of_one_equal_one_batch_of_four(tmp_path, small_data, repo_root):
    big = run_in_process(
        write_recipe(tmp_path, small_data, repo_root, "big", max_steps=2, micro_batch_size=4)
    )
    accumulated = run_in_process(
        write_recipe(tmp_path, small_data, repo_root, "acc", max_steps=2, micro_batch_size=1, grad_accum=4)
    )
    assert losses(big.parent) == pytest.approx(losses(accumulated.parent), rel=1e-5)
    assert_same_weights(weights(big), weights(accumulated), atol=1e-5)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", *args]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_at_the_same_global_batch(tmp_path, small_data, repo_root):
    one = write_recipe(tmp_path, small_data, repo_root, "one", max_steps=2, micro_batch_size=1, grad_accum=4)
    two = write_recipe(tmp_path, small_data, repo_root, "two", max_steps=2, micro_batch_size=1, grad_accum=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
    ]
    subprocess.run([*launcher, "-m", "posttrain.cli", "sft", str(two)], check=True, env=env, timeout=600)
    single = run_in_process(one)
    assert losses(tmp_path / "two") == pytest.approx(losses(single.parent), rel=1e-5)
    assert_same_weights(weights(single), weights(tmp_path / "two" / "model"), atol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, small_data, repo_root):
    settings = {"max_steps": 16, "micro_batch_size": 2}  # killed after step 8, resumed from its checkpoint
    reference = run_in_process(write_recipe(tmp_path, small_data, repo_root, "ref", **settings))

    recipe = write_recipe(tmp_path, small_data, repo_root, "killed", **settings)
    overrides = ["checkpoint.every=4"]
    proc = subprocess.Popen(
        cli("sft", str(recipe), *overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints.exists() and any(p.name == "step_00000008" for p in checkpoints.iterdir())):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()

    subprocess.run(
        cli("sft", str(recipe), *overrides, "--resume"), check=True, timeout=600, capture_output=True
    )
    assert_same_weights(weights(reference), weights(tmp_path / "killed" / "model"), atol=0)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 17))


def test_lora_switch_trains_adapters_only_and_saves_adapter_and_merged_model(tmp_path, small_data, repo_root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = write_recipe(tmp_path, small_data, repo_root, "lora", max_steps=3, micro_batch_size=2)
    recipe = load_recipe(path, SFTRecipe, ["model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"])
    model_dir = train_sft(recipe)
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_config(merged.config)
    with_adapter = PeftModel.from_pretrained(base, model_dir / "adapter")
    adapter_keys = [k for k in with_adapter.state_dict() if "lora_" in k]
    assert adapter_keys and all(("q_proj" in k) or ("v_proj" in k) for k in adapter_keys)
    # lora_B starts at zero: non-zero values mean the adapters, and only they, were trained
    assert any(float(v.abs().max()) > 0 for k, v in with_adapter.state_dict().items() if "lora_B" in k)
    assert losses(model_dir.parent)[-1] < losses(model_dir.parent)[0]


def test_fused_chunked_loss_gives_the_numbers_of_the_plain_head_and_loss(tmp_path, small_data, repo_root):
    """train.loss_chunk_size (the default path) never builds [tokens, vocab] logits; same losses and weights."""
    plain = run_in_process(
        write_recipe(
            tmp_path, small_data, repo_root, "plain", max_steps=2, micro_batch_size=2, loss_chunk_size=None
        )
    )
    chunked = run_in_process(
        write_recipe(
            tmp_path, small_data, repo_root, "chunked", max_steps=2, micro_batch_size=2, loss_chunk_size=64
        )
    )
    assert losses(plain.parent) == pytest.approx(losses(chunked.parent), rel=1e-5)
    # Adam turns float-rounding differences of near-zero gradients into ~1e-5 steps; a wrong gradient moves ~lr=1e-3
    assert_same_weights(weights(plain), weights(chunked), atol=5e-5)
