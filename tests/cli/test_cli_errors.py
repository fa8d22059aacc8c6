"""The CLI's answer to a user's mistake: one `error: FILE: line N: field X: message` line per problem on stderr,
exit status 2, no traceback unless --debug. Line numbers are 1-based, as editors show them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import cli
from posttrain.cli import main
from posttrain.config import GRPORecipe, RecipeError, load_recipe

UNKNOWN_KEY = "unknown key (check the spelling; see `posttrain <command> --help` for the recipe format)"


@pytest.fixture
def sft_recipe(tmp_path, repo_root):
    """sft_recipe(extra_yaml, train=...) -> path of an SFT recipe; the YAML's line numbers are fixed here."""

    def write(extra: str = "", train: str | None = None) -> Path:
        path = tmp_path / "sft.yaml"
        path.write_text(
            "model:\n"  # line 1
            f"  from_config: {repo_root / 'recipes/models/tiny_qwen2.json'}\n"
            f"  tokenizer: {repo_root / 'data/tokenizer'}\n"
            "data:\n"  # line 4
            f"  train: {train or repo_root / 'data/arith/sft.jsonl'}\n"
            f"output_dir: {tmp_path / 'out'}\n"  # line 6
            "train:\n"  # line 7
            "  max_steps: 1\n" + extra  # line 8, then the extra lines from 9 on
        )
        return path

    return write


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit status and stderr's lines (progress bars of data loading left out)."""
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [
        line for line in err.splitlines() if line and not line.startswith(("Generating", "tokenising"))
    ]


def test_bad_recipe_fields_are_one_line_each_at_their_yaml_lines(sft_recipe, capsys):
    path = sft_recipe("  learnin_rate: 3\n  lr: fast\n  micro_batch_size: 0\n")
    code, err = run_cli(capsys, "sft", path)
    assert code == 2
    assert err == [
        f"error: {path}: line 9: field train.learnin_rate: {UNKNOWN_KEY}",
        f"error: {path}: line 10: field train.lr: Input should be a valid number, unable to parse string as a "
        "number (got 'fast')",
        f"error: {path}: line 11: field train.micro_batch_size: Input should be greater than 0 (got 0)",
    ]


def test_missing_recipe_and_missing_data_file(sft_recipe, tmp_path, capsys):
    assert run_cli(capsys, "sft", tmp_path / "nope.yaml") == (
        2,
        [f"error: {tmp_path / 'nope.yaml'}: recipe file not found"],
    )
    path = sft_recipe(train=str(tmp_path / "missing.jsonl"))
    assert run_cli(capsys, "sft", path) == (
        2,
        [f"error: {path}: line 5: field data.train: file not found: {tmp_path / 'missing.jsonl'}"],
    )


def test_overrides_of_unknown_keys_and_bad_values_name_the_override(sft_recipe, capsys):
    code, err = run_cli(capsys, "sft", sft_recipe(), "train.learnin_rate=1e-5", "train.max_steps=-1", "oops")
    assert (code, err) == (2, ["error: override oops: expected dotted.key=value"])
    code, err = run_cli(capsys, "sft", sft_recipe(), "train.learnin_rate=1e-5", "train.max_steps=-1")
    assert code == 2
    assert err == [
        "error: override train.max_steps: field train.max_steps: Input should be greater than 0 (got -1)",
        f"error: override train.learnin_rate: field train.learnin_rate: {UNKNOWN_KEY}",
    ]


@pytest.fixture
def grpo_recipe(tmp_path, repo_root) -> Path:
    path = tmp_path / "grpo.yaml"
    path.write_text(
        f"model: {{from_config: {repo_root / 'recipes/models/tiny_qwen2.json'}, "
        f"tokenizer: {repo_root / 'data/tokenizer'}}}\n"
        f"data: {{train: {repo_root / 'data/arith/rl.jsonl'}}}\n"
        "rewards:\n"
        "  functions:\n"
        "    - {name: math_accuracy, weight: 1.0}\n"  # line 5
        "    - {name: think_format, weight: 0.2}\n"  # line 6
        f"output_dir: {tmp_path / 'out'}\n"
    )
    return path


def test_list_items_are_overridden_in_place(grpo_recipe):
    recipe = load_recipe(
        grpo_recipe, GRPORecipe, ["rewards.functions.0.weight=0.5", "rewards.functions.1.kwargs={a: 1}"]
    )
    assert [(f.name, f.weight, f.kwargs) for f in recipe.rewards.functions] == [
        ("math_accuracy", 0.5, {}),
        ("think_format", 0.2, {"a": 1}),
    ]
    whole = load_recipe(grpo_recipe, GRPORecipe, ["rewards.functions=[{name: math_accuracy}]"])
    assert [f.name for f in whole.rewards.functions] == ["math_accuracy"]


def test_a_bad_list_index_names_the_list_and_its_length(grpo_recipe, capsys):
    whole_list = "to add or remove items set the whole list: rewards.functions=[...]"
    for index in (5, 2):  # 2 == len: appending by index is refused too, the whole list is set instead
        code, err = run_cli(capsys, "grpo", grpo_recipe, f"rewards.functions.{index}.weight=1")
        assert (code, err) == (
            2,
            [
                f"error: override rewards.functions.{index}.weight: list rewards.functions has 2 items "
                f"(indices 0-1); {whole_list}"
            ],
        )
    code, err = run_cli(
        capsys, "grpo", grpo_recipe, "rewards.functions.1.weight=heavy", "rewards.functions.0.wieght=1"
    )
    assert code == 2
    assert err == [
        f"error: override rewards.functions.0.wieght: field rewards.functions.0.wieght: {UNKNOWN_KEY}",
        "error: override rewards.functions.1.weight: field rewards.functions.1.weight: Input should be a valid "
        "number, unable to parse string as a number (got 'heavy')",
    ]


def test_a_bad_value_inside_a_list_item_is_on_its_line(grpo_recipe, capsys):
    grpo_recipe.write_text(grpo_recipe.read_text().replace("weight: 0.2", "weight: [0.2]"))
    code, err = run_cli(capsys, "grpo", grpo_recipe)
    assert (code, err) == (
        2,
        [f"error: {grpo_recipe}: line 6: field rewards.functions.1.weight: Input should be a valid number"],
    )


def test_a_malformed_sft_row_is_reported_at_its_file_line(sft_recipe, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    bad = {"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistent", "content": "3"}]}
    data = tmp_path / "bad.jsonl"
    # A blank line 2: the bad row is the third row (index 2) and sits on line 4.
    data.write_text(f"{json.dumps(good)}\n\n{json.dumps(good)}\n{json.dumps(bad)}\n")
    code, err = run_cli(capsys, "sft", sft_recipe(train=str(data)))
    assert (code, err) == (
        2,
        [
            f"error: {data}: line 4: field messages[1].role: unknown role 'assistent' (expected one of system, "
            "user, assistant)"
        ],
    )


def test_an_output_dir_with_a_run_needs_resume_or_overwrite(sft_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "recipe.yaml").write_text("{}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    recipe = sft_recipe(train=str(bad))
    code, err = run_cli(capsys, "sft", recipe)
    assert (code, err) == (
        2,
        [
            f"error: {out}: output_dir already holds checkpoints: pass --resume to continue that run, "
            "--overwrite to delete it and start afresh, or choose another output_dir"
        ],
    )
    # --overwrite deletes the old run; this one then stops at its first (bad) row.
    code, err = run_cli(capsys, "sft", recipe, "--overwrite")
    assert code == 2 and err[0].startswith(f"error: {bad}: line 1: field messages[0].role")
    assert not (out / "checkpoints").exists()


def test_distill_refuses_an_existing_run_before_its_first_evaluation(
    tmp_path, repo_root, capsys, monkeypatch
):
    from posttrain.trainers import distill

    def no_model(*args: object) -> None:
        raise AssertionError("a model was loaded for a run that is refused")

    monkeypatch.setattr(distill, "load_causal_lm", no_model)  # the "before" evaluation's first step
    out = tmp_path / "out"
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(
        "model:\n"
        f"  from_config: {repo_root / 'recipes/models/tiny_qwen2.json'}\n"
        f"  tokenizer: {repo_root / 'data/tokenizer'}\n"
        f"data: {{train: [{repo_root / 'data/arith/sft.jsonl'}]}}\n"
        "rewards: {functions: [{name: math_accuracy}]}\n"
        f"eval: {{prompts: [{repo_root / 'data/arith/test.jsonl'}]}}\n"
        f"output_dir: {out}\n"
    )
    assert run_cli(capsys, "distill", recipe) == (
        2,
        [
            f"error: {out}: output_dir already holds checkpoints: pass --resume to continue that run, "
            "--overwrite to delete it and start afresh, or choose another output_dir"
        ],
    )
    assert not (out / "eval.json").exists()


def test_overwrite_deletes_only_a_previous_run(sft_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "sft", sft_recipe(), "--overwrite")
    assert (code, err) == (
        2,
        [
            f"error: {out}: --overwrite deletes only a previous run's directory (one holding recipe.yaml, not the "
            "working directory or one above it); remove it yourself or choose another output_dir"
        ],
    )
    assert (out / "notes.txt").read_text() == "mine"


def test_no_traceback_unless_debug(sft_recipe):
    path = sft_recipe("  lr: fast\n")
    command = [sys.executable, "-m", "posttrain.cli", "sft", str(path)]
    quiet = subprocess.run(command, capture_output=True, text=True)
    expected = (
        f"error: {path}: line 9: field train.lr: Input should be a valid number, unable to parse string as a "
        "number (got 'fast')\n"
    )
    assert (quiet.returncode, quiet.stderr) == (2, expected)
    loud = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert loud.returncode == 1 and loud.stderr.startswith("Traceback")
    assert loud.stderr.rstrip().endswith(expected.removeprefix("error: ").rstrip())


def test_resume_and_overwrite_exclude_each_other(sft_recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", str(sft_recipe()), "--resume", "--overwrite"])
    assert exit_info.value.code == 2
    assert "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err


def test_debug_before_the_command_raises_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="recipe file not found"):
        main(["--debug", "sft", str(tmp_path / "nope.yaml")])

    def buggy(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setitem(cli.COMMANDS, "sft", ("summary", "details", buggy))
    with pytest.raises(KeyError, match="a bug"):
        main(["sft", str(tmp_path / "nope.yaml")])


def test_overrides_after_an_option_are_overrides(grpo_recipe, capsys):
    code, err = run_cli(capsys, "grpo", grpo_recipe, "--resume", "rewards.functions.5.weight=1")
    assert code == 2 and err[0].startswith(
        "error: override rewards.functions.5.weight: list rewards.functions"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", str(grpo_recipe), "--resume", "junk"])
    assert exit_info.value.code == 2 and "unrecognized arguments: junk" in capsys.readouterr().err


def test_convert_of_a_missing_or_foreign_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nothing.gguf"
    code, err = run_cli(capsys, "convert", missing, tmp_path / "out")
    assert (code, err) == (2, [f"error: {missing}: GGUF file not found"])
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    code, err = run_cli(capsys, "convert", notes, tmp_path / "out")
    assert (code, err) == (
        2,
        [f"error: {notes}: not a GGUF file (starts with b'not ', GGUF files start with b'GGUF')"],
    )
