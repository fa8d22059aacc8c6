"""A generation backend drives the policy it is given or is refused before any weight is loaded, naming the
backend that works: `hf` cannot drive posttrain's DeepSeek-V3, vLLM's CPU MLA serves only a 576-wide latent
cache, `latent` drives only posttrain's DeepSeek-V3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.config import GRPORecipe, RecipeError, load_recipe
from posttrain.generation.factory import build_backend
from posttrain.traces.config import TracesRecipe

HF_REFUSED = (
    "'hf' drives transformers models, not posttrain's DeepSeek-V3 (model.implementation auto|posttrain picks it "
    "for deepseek_v3 configs); use generation.backend=latent (our absorbed-MLA decoding) or auto"
)


def vllm_refused(kv_lora: int, rope: int) -> str:
    return (
        "vLLM's CPU MLA attention needs kv_lora_rank + qk_rope_head_dim = 576 (DeepSeek-V3: 512 + 64), this "
        f"model has {kv_lora} + {rope} = {kv_lora + rope}; use generation.backend=auto (latent: our absorbed-MLA "
        "decoding, for posttrain's DeepSeek-V3) or hf"
    )


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    """vLLM's MLA widths differ by device: these tests ask for the CPU's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def deepseek_checkpoint(tmp_path, repo_root) -> Path:
    """A directory that looks like the quickstart's SFT model (config.json) but holds no weights at all: a
    backend refused before loading never notices."""
    directory = tmp_path / "sft_model"
    directory.mkdir()
    (directory / "config.json").write_text((repo_root / "recipes/models/tiny_deepseek_v3.json").read_text())
    return directory


def grpo_recipe(tmp_path: Path, repo_root: Path, model_config: dict, backend: str, **model: str) -> Path:
    config = tmp_path / "model.json"
    config.write_text(json.dumps(model_config))
    path = tmp_path / "grpo.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "from_config": str(config),
                    "tokenizer": str(repo_root / "data/tokenizer"),
                    **model,
                },
                "data": {"train": str(repo_root / "data/arith/rl.jsonl")},
                "generation": {"backend": backend, "max_tokens": 8},
                "rewards": {"functions": [{"name": "math_accuracy"}]},
                "output_dir": str(tmp_path / "out"),
            },
            sort_keys=False,
        )
    )
    return path


def backend_line(recipe: Path) -> int:
    return next(n for n, line in enumerate(recipe.read_text().splitlines(), 1) if "backend:" in line)


@pytest.fixture
def tiny_deepseek(repo_root) -> dict:
    return json.loads((repo_root / "recipes/models/tiny_deepseek_v3.json").read_text())


def test_hf_is_refused_for_posttrain_deepseek_at_its_yaml_line(tmp_path, repo_root, tiny_deepseek):
    path = grpo_recipe(tmp_path, repo_root, tiny_deepseek, "hf")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, GRPORecipe)
    assert str(info.value) == f"{path}: line {backend_line(path)}: field generation.backend: {HF_REFUSED}"
    transformers_model = grpo_recipe(tmp_path, repo_root, tiny_deepseek, "hf", implementation="transformers")
    assert load_recipe(transformers_model, GRPORecipe).generation.backend == "hf"


def test_vllm_is_refused_for_an_mla_width_its_cpu_kernels_lack(tmp_path, repo_root, tiny_deepseek):
    path = grpo_recipe(tmp_path, repo_root, tiny_deepseek, "vllm")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, GRPORecipe)
    assert (
        str(info.value)
        == f"{path}: line {backend_line(path)}: field generation.backend: {vllm_refused(64, 16)}"
    )
    deepseek_shaped = {**tiny_deepseek, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    assert load_recipe(grpo_recipe(tmp_path, repo_root, deepseek_shaped, "vllm"), GRPORecipe)


def test_latent_is_refused_for_a_transformers_model(tmp_path, repo_root):
    qwen2 = json.loads((repo_root / "recipes/models/tiny_qwen2.json").read_text())
    with pytest.raises(
        RecipeError,
        match=r"'latent' drives posttrain's DeepSeek-V3 only, and this model is "
        r"transformers' 'qwen2'; use generation.backend=auto or hf",
    ):
        load_recipe(grpo_recipe(tmp_path, repo_root, qwen2, "latent"), GRPORecipe)
    for backend in ("auto", "hf", "vllm"):
        assert load_recipe(grpo_recipe(tmp_path, repo_root, qwen2, backend), GRPORecipe)


def test_bundled_traces_recipe_drives_the_quickstart_model(
    deepseek_checkpoint, repo_root, monkeypatch, capsys
):
    monkeypatch.chdir(repo_root)
    model = f"model.path={deepseek_checkpoint}"
    recipe = load_recipe("recipes/traces_arith.yaml", TracesRecipe, [model])
    assert recipe.generation.backend == "auto"
    code = main(["traces", "recipes/traces_arith.yaml", model, "generation.backend=hf"])
    assert code == 2
    assert (
        capsys.readouterr().err
        == f"error: override generation.backend: field generation.backend: {HF_REFUSED}\n"
    )


def test_backends_refuse_a_model_they_cannot_drive_when_built_in_code(deepseek_checkpoint, tiny_deepseek):
    from posttrain.model import DeepseekV3Config, DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(tiny_deepseek))
    with pytest.raises(RecipeError, match="'hf' drives transformers models, not posttrain's DeepSeek-V3"):
        build_backend("hf", model=model, tokenizer=None)
    with pytest.raises(RecipeError) as info:
        build_backend("vllm", model_path=str(deepseek_checkpoint))
    assert str(info.value) == f"field generation.backend: {vllm_refused(64, 16)}"
