"""`posttrain distill` with logit distillation: the KD term runs through the packed SFT steps and falls; a
teacher with another tokenizer is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from posttrain.generation.testing import build_tiny_qwen2
from posttrain.trainers.distill import DistillRecipe, train_distill


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, repo_root) -> str:
    lines = (repo_root / "data" / "arith" / "sft.jsonl").read_text().splitlines()[:24]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, repo_root) -> Path:
    """A random-weight teacher of the student's shape, with the student's tokenizer."""
    directory = tmp_path_factory.mktemp("teacher")
    config = AutoConfig.for_model(**json.loads((repo_root / "recipes/models/tiny_qwen2.json").read_text()))
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(repo_root / "data" / "tokenizer").save_pretrained(directory)
    return directory


def recipe(tmp_path, repo_root, data, teacher, steps=10, **kd) -> DistillRecipe:
    return DistillRecipe.model_validate(
        {
            "model": {
                "from_config": str(repo_root / "recipes/models/tiny_qwen2.json"),
                "tokenizer": str(repo_root / "data/tokenizer"),
                "mtp": {"attach_depth": 0},
            },
            "data": {"train": [data], "max_seq_len": 256},
            "packing": {"capacity": 256},
            "train": {"max_steps": steps, "micro_batch_size": 2, "lr": 3e-3, "min_lr": 3e-3, "seed": 0},
            "kd": {"teacher": {"path": str(teacher)}, **kd},
            "logging": {"tensorboard": False, "progress": False},
            "output_dir": str(tmp_path / "distill"),
        }
    )


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_forward_kl_distillation_runs_and_the_kd_loss_falls(tmp_path, repo_root, small_data, teacher_dir):
    model_dir = train_distill(recipe(tmp_path, repo_root, small_data, teacher_dir, alpha=1.0))
    rows = metrics(model_dir.parent)
    kd = [r["kd_loss"] for r in rows]
    assert len(kd) == 10 and all(torch.isfinite(torch.tensor(kd)))
    assert sum(kd[-3:]) / 3 < 0.7 * sum(kd[:3]) / 3, kd
    assert all(r["loss"] == pytest.approx(r["kd_loss"], rel=1e-5) for r in rows)  # α = 1: KD only
    assert rows[0]["sft_loss"] > 0
    AutoModelForCausalLM.from_pretrained(model_dir)  # a plain transformers checkpoint
    assert (model_dir.parent / "report.png").exists()


@pytest.mark.slow
def test_jsd_distillation_mixes_with_the_sft_loss(tmp_path, repo_root, small_data, teacher_dir):
    model_dir = train_distill(
        recipe(
            tmp_path,
            repo_root,
            small_data,
            teacher_dir,
            divergence="jsd",
            beta=0.3,
            alpha=0.25,
            temperature=2.0,
        )
    )
    for row in metrics(model_dir.parent):
        assert 0 < row["kd_loss"] < 0.7  # JSD(β) ≤ h(0.3) ≈ 0.611 nats
        assert row["loss"] == pytest.approx(0.75 * row["sft_loss"] + 0.25 * 4.0 * row["kd_loss"], rel=1e-5)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, repo_root, small_data):
    other = build_tiny_qwen2(tmp_path / "other")
    with pytest.raises(ValueError, match="tokenizer differs"):
        train_distill(recipe(tmp_path, repo_root, small_data, other))


def test_the_student_is_evaluated_in_the_precision_it_trains_in(tmp_path, repo_root, small_data, monkeypatch):
    """`evaluate_student` decodes under the autocast that `compute_dtype` gives for the student's model section
    (bf16 on a GPU with `model.dtype: auto`; forced here on CPU), as GRPO's rollouts and a traces teacher do."""
    import posttrain.trainers.distill as distill
    from posttrain.generation.factory import make_backend

    backends = []

    def recording_make_backend(*args, **kwargs):
        backends.append(make_backend(*args, **kwargs))
        return backends[-1]

    monkeypatch.setattr(distill, "compute_dtype", lambda cfg: torch.bfloat16)
    monkeypatch.setattr(distill, "make_backend", recording_make_backend)
    student = recipe(tmp_path, repo_root, small_data, teacher=repo_root).model_copy(
        update={
            "kd": None,
            "generation": distill.GenerationSection(max_tokens=8, temperature=0.0),
            "rewards": distill.RewardsSection.model_validate({"functions": [{"name": "math_accuracy"}]}),
            "eval": distill.DistillEvalSection(
                prompts=[str(repo_root / "data/arith/test.jsonl")], max_prompts=2
            ),
        }
    )
    model_dir = build_tiny_qwen2(tmp_path / "student_model")
    result = distill.evaluate_student(model_dir, AutoTokenizer.from_pretrained(model_dir), student)
    assert [backend.autocast for backend in backends] == [torch.bfloat16]
    assert result["eval/prompts"] == 2 and 0.0 <= result["eval/reward"] <= 1.0
