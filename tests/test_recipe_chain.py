"""The bundled recipes chained as their comments document them, through the `posttrain` command line:

    posttrain sft recipes/sft_quickstart.yaml            (the session's quickstart SFT model, tests/conftest.py)
    posttrain traces recipes/traces_arith.yaml           (its verified traces)
    posttrain distill recipes/distill_arith.yaml         (a student trained on them)
    posttrain distill recipes/distill_kd_arith.yaml      (the same with the teacher's logits)
    posttrain eval-rewards recipes/rewardbench_demo.yaml (the distilled student as a judge)

Each step runs the bundled file with overrides that only point it at the previous step's output and shrink its
budget (prompts, steps, pairs), so a recipe that rots (a renamed key, a backend that cannot drive its model, a
path the next step cannot read) fails here. That distillation hands over the teacher's skill at full size (the
student's held-out accuracy against the teacher's) is measured by bench/distill.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# The recipes bound each reward call by 5 s; a worker started on a loaded CI machine can take longer to import
# the math verifier, and a timed-out call scores 0, which would read as a teacher or student that cannot count.
PATIENT_REWARDS = "rewards.timeout_s=120"


def posttrain(*args: str) -> None:
    """`posttrain ARGS` from the repository root, where the recipes' relative paths point."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        assert main(list(args)) == 0, args


@pytest.fixture(scope="module")
def traces(quickstart_sft_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chain") / "traces"
    posttrain(
        "traces",
        "recipes/traces_arith.yaml",
        f"model.path={quickstart_sft_model}",
        f"output_dir={out}",
        "run.max_prompts=200",
        PATIENT_REWARDS,
    )
    return out


@pytest.fixture(scope="module")
def student(traces) -> Path:
    out = traces.parent / "distill"
    posttrain(
        "distill",
        "recipes/distill_arith.yaml",
        f"data.train={traces}",
        f"output_dir={out}",
        "eval.max_prompts=20",
        "train.max_steps=40",
        PATIENT_REWARDS,
        "logging.progress=false",
        "logging.tensorboard=false",
    )
    return out / "model"


def test_traces_of_the_quickstart_model_are_verified_r1_rows(traces, repo_root):
    summary = json.loads((traces / "summary.json").read_text())
    assert summary["prompts"] == 200 and summary["failed_prompts"] == 0
    # the teacher solves some of them: one trace kept per solved problem (measured: 67 of 200)
    assert summary["accepted"] >= 20, summary
    prompt_files = (
        "data/arith/sft_prompts.jsonl",
        "data/arith/rl.jsonl",
    )  # the recipe's data.train, in order
    answers = [json.loads(line)["answer"] for name in prompt_files for line in (repo_root / name).open()]
    rows = [json.loads(line) for path in summary["accepted_files"] for line in open(path)]
    assert len(rows) == summary["accepted"]
    assert len({row["prompt_index"] for row in rows}) == len(rows)  # one trace per problem
    for row in rows:  # each kept trace reasons in <think> and ends with the prompt's right answer
        answer = row["messages"][-1]["content"]
        assert answer.startswith("<think>") and "</think>" in answer
        assert answer.endswith(f"\\boxed{{{answers[row['prompt_index']]}}}."), (
            row,
            answers[row["prompt_index"]],
        )


def test_student_distilled_from_the_traces_learns_the_answer_format(student):
    result = json.loads((student.parent / "eval.json").read_text())
    before, after = result["before"], result["after"]
    assert before["eval/prompts"] == after["eval/prompts"] == 20
    # reward = math_accuracy + 0.2 r1_format: a random student scores 0; after 40 steps on the traces it writes
    # <think>...</think> and a boxed number (measured 0.0 -> 0.24, accuracy 0 -> 0.05)
    assert before["eval/reward"] == 0.0 and after["eval/reward"] > 0.1, result


def test_logit_distillation_recipe_runs_on_the_traces_and_the_kd_loss_falls(quickstart_sft_model, traces):
    out = traces.parent / "distill_kd"
    posttrain(
        "distill",
        "recipes/distill_kd_arith.yaml",
        f"data.train={traces}",
        f"kd.teacher.path={quickstart_sft_model}",
        f"output_dir={out}",
        "eval.max_prompts=8",
        "train.max_steps=12",
        PATIENT_REWARDS,
        "logging.progress=false",
        "logging.tensorboard=false",
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [row["kd_loss"] for row in rows]
    assert len(kd) == 12 and sum(kd[-3:]) < 0.7 * sum(kd[:3]), kd
    assert set(json.loads((out / "eval.json").read_text())) == {"before", "after"}


def test_rewardbench_demo_judges_the_bundled_pairs_with_the_distilled_student(student, tmp_path):
    out = tmp_path / "rewardbench"
    posttrain(
        "eval-rewards",
        "recipes/rewardbench_demo.yaml",
        f"rewardbench.judge.model={student}",
        f"rewardbench.output_dir={out}",
        "rewardbench.max_pairs=4",
    )
    results = json.loads((out / "results.json").read_text())
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert results["pairs"] == len(verdicts) == 4
    assert all(len(row["verdicts"]) == 2 for row in verdicts)  # both orders, as the recipe asks
    assert 0.0 <= results["overall"] <= 1.0
