"""The trace pipeline with a scripted teacher whose right and wrong samples are known in advance."""

from __future__ import annotations

import functools
import json

import datasets
import pytest
from scripted_teacher import ScriptedBackend, arithmetic_teacher, solve, unit_hash

from posttrain.data.arithmetic import Problem
from posttrain.traces import run_traces
from posttrain.traces.ledger import TraceLedger


@pytest.fixture(scope="module")
def teacher_tokenizer(repo_root):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(repo_root / "data" / "tokenizer")


def read_rows(out, stream):
    return [json.loads(line) for part in sorted((out / stream).glob("part-*.jsonl")) for line in part.open()]


def test_rejection_keeps_exactly_the_verified_samples(traces_recipe, teacher_tokenizer):
    recipe = traces_recipe("exact", max_prompts=12)
    teacher = ScriptedBackend(teacher_tokenizer, arithmetic_teacher(wrong_rate=0.4))
    out = run_traces(recipe, backend=teacher)

    samples = read_rows(out, "samples")
    assert sorted((s["prompt_index"], s["sample_index"]) for s in samples) == [
        (p, k) for p in range(12) for k in range(4)
    ]
    expected = set()
    for s in samples:  # the teacher's script says which samples are right, independently of any reward
        seed = recipe.generation.seed + 1009 * (s["prompt_index"] // 4)  # batch b samples with seed + 1009 b
        if unit_hash(question_of(s["prompt_index"], recipe), s["sample_index"], seed) >= 0.4:
            expected.add((s["prompt_index"], s["sample_index"]))
    assert 0 < len(expected) < len(samples)
    assert {(s["prompt_index"], s["sample_index"]) for s in samples if s["verified"]} == expected
    accepted = read_rows(out, "accepted")
    assert {(r["prompt_index"], r["sample_index"]) for r in accepted} == expected
    for row in accepted:
        answer = solve(row["messages"][1]["content"]).answer
        assert row["messages"][-1]["content"].endswith(f"\\boxed{{{answer}}}.")
        assert row["rewards"] == {"math_accuracy": 1.0} and row["reward_total"] == 1.0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"] == len(expected) and summary["samples"] == 48
    source = summary["per_source"][recipe.data.train[0]]
    assert source["pass_at_k"]["1"] == pytest.approx(len(expected) / 48)
    assert (out / "lengths.png").stat().st_size > 5000 and (out / "acceptance.png").stat().st_size > 5000


@functools.cache
def questions_in(path: str) -> list[str]:
    with open(path) as handle:
        return [json.loads(line)["prompt"][-1]["content"] for line in handle]


def question_of(index, recipe):
    return questions_in(recipe.data.train[0])[index]


def test_records_are_sft_ready_in_both_formats_with_provenance(traces_recipe, teacher_tokenizer):
    recipe = traces_recipe("formats", max_prompts=8, accept={"max_per_prompt": 1})
    out = run_traces(recipe, backend=ScriptedBackend(teacher_tokenizer, arithmetic_teacher(0.0)))
    rows = datasets.load_dataset("json", data_files=[str(p) for p in (out / "accepted").glob("*.jsonl")])[
        "train"
    ]
    assert len(rows) == 8  # one per prompt (k = 1)
    row = rows[0]
    system, user, assistant = row["messages"]
    assert system == {"role": "system", "content": recipe.output.r1_system_prompt}
    assert user["role"] == "user" and assistant["content"].startswith("<think>")
    assert row["messages_original"] == [
        user,
        {"role": "assistant", "content": assistant["content"].split("</think>")[1].strip()},
    ]
    assert row["teacher"] == "scripted-arithmetic"
    assert (
        row["sampling"]["n"] == 4
        and row["sampling"]["backend"] == recipe.generation.backend
        and row["sampling"]["max_tokens"] == 64
    )
    assert set(row["filters_passed"]) == {"format", "language", "repetition"}
    # 16 sample rows per batch > shard_rows = 10: each batch starts a new part (a batch never spans two).
    assert sorted(p.name for p in (out / "samples").glob("*.jsonl")) == [
        "part-00000.jsonl",
        "part-00001.jsonl",
    ]


def test_filters_reject_bad_samples_and_record_why(traces_recipe, teacher_tokenizer):
    def respond(question, k, seed):
        good = solve(question).trace()
        return [
            good,
            good.replace("<think>", ""),  # format
            good.replace("</think>", "所以答案是这个数字</think>"),  # mixed scripts
            good.replace(
                "</think>", "\n" + solve(question).steps[0] * 12 + "\n</think>"
            ),  # loop, overthinking
        ][k]

    recipe = traces_recipe(
        "filters",
        max_prompts=4,
        filters={"max_repeated_ngram_fraction": 0.3, "repetition_ngram": 4, "max_think_ratio": 3.0},
    )
    out = run_traces(recipe, backend=ScriptedBackend(teacher_tokenizer, respond))
    samples = read_rows(out, "samples")
    assert all(s["verified"] for s in samples)  # every answer is right; only readability differs
    by_k = {k: [s for s in samples if s["sample_index"] == k] for k in range(4)}
    assert all(s["accepted"] and not any(s["filters"].values()) for s in by_k[0])
    assert all(s["filters"]["format"] and not s["accepted"] for s in by_k[1])
    assert all(s["filters"]["language"] and not s["accepted"] for s in by_k[2])
    assert all(s["filters"]["repetition"] and s["filters"]["overthinking"] for s in by_k[3])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["filters"]["language"]["rejected"] == 4 and summary["accepted"] == 4


def test_best_of_n_keeps_the_highest_reward_sample(traces_recipe, teacher_tokenizer):
    def respond(question, k, seed):
        problem = solve(question)
        wrong = Problem(question, problem.steps, problem.answer + 1)
        return [wrong.trace(), problem.trace(), problem.trace().replace("<think>", ""), problem.trace()][k]

    recipe = traces_recipe(
        "best",
        max_prompts=4,
        rewards={"functions": [{"name": "math_accuracy"}, {"name": "r1_format", "weight": 0.5}]},
        accept={"rule": "best_of_n", "threshold": 1.0},
        filters={"require_format": False},
    )
    out = run_traces(recipe, backend=ScriptedBackend(teacher_tokenizer, respond))
    accepted = read_rows(out, "accepted")
    assert [(r["prompt_index"], r["sample_index"], r["reward_total"]) for r in accepted] == [
        (p, 1, 1.5) for p in range(4)
    ]  # samples 1 and 3 tie at 1.5 (same length): the first; sample 2 is right but scores 1.0


def test_a_prompt_that_keeps_failing_is_recorded_with_its_reason(traces_recipe, teacher_tokenizer):
    questions = [question_of(i, traces_recipe("q")) for i in range(8)]
    teacher = ScriptedBackend(teacher_tokenizer, arithmetic_teacher(0.0), fail=lambda q: q == questions[5])
    recipe = traces_recipe("failing", max_prompts=8, run={"max_attempts": 3})
    out = run_traces(recipe, backend=teacher)
    assert teacher.calls == [
        4,
        4,
        1,
        1,
        1,
        1,
        1,
        1,
    ]  # the batch, then prompt 5 alone (3 tries), 4..7 once each
    failed = read_rows(out, "failed")
    assert len(failed) == 1 and failed[0]["prompt_index"] == 5
    assert "failed after 3 attempts: ConnectionError: endpoint error" in failed[0]["reason"]
    assert sorted({s["prompt_index"] for s in read_rows(out, "samples")}) == [0, 1, 2, 3, 4, 6, 7]
    assert json.loads((out / "summary.json").read_text())["failed_prompts"] == 1


def test_rerunning_without_resume_refuses_and_resume_of_a_finished_run_adds_nothing(
    traces_recipe, teacher_tokenizer
):
    recipe = traces_recipe("again", max_prompts=8)
    teacher = ScriptedBackend(teacher_tokenizer, arithmetic_teacher(0.2))
    out = run_traces(recipe, backend=teacher)
    before = {p.name: p.read_bytes() for p in (out / "accepted").iterdir()}
    with pytest.raises(FileExistsError, match="--resume"):
        run_traces(recipe, backend=teacher)
    calls = len(teacher.calls)
    run_traces(recipe, resume=True, backend=teacher)
    assert len(teacher.calls) == calls
    assert {p.name: p.read_bytes() for p in (out / "accepted").iterdir()} == before
    with pytest.raises(ValueError, match="changed: accept"):
        run_traces(
            traces_recipe("again", max_prompts=8, accept={"threshold": 0.5}), resume=True, backend=teacher
        )


def test_ledger_discards_a_torn_commit(tmp_path):
    ledger = TraceLedger(tmp_path, shard_rows=100)
    ledger.open(resume=False)
    ledger.commit(0, [0, 1], {"accepted": [{"id": "0-0"}], "samples": [{"id": "0-0"}, {"id": "1-0"}]})
    # A killed second commit: its rows reached the shards, its ledger line only half-way.
    with (tmp_path / "accepted" / "part-00000.jsonl").open("a") as handle:
        handle.write('{"id": "2-0"}\n{"id": "3')
    with (tmp_path / "ledger.jsonl").open("a") as handle:
        handle.write('{"batch": 1, "prom')
    resumed = TraceLedger(tmp_path, shard_rows=100)
    resumed.open(resume=True)
    assert resumed.done == {0}
    assert resumed.read("accepted") == [{"id": "0-0"}]
    assert len((tmp_path / "ledger.jsonl").read_text().splitlines()) == 1


def test_the_recipe_teacher_runs_through_the_transformers_backend(traces_recipe):
    """No scripted backend: the teacher the recipe names (a random tiny Qwen2) samples through `hf`."""
    recipe = traces_recipe(
        "hf",
        max_prompts=3,
        generation={"backend": "hf", "max_tokens": 8},
        accept={"num_samples": 2, "pass_at_k": [1]},
    )
    out = run_traces(recipe)
    samples = read_rows(out, "samples")
    assert sorted((s["prompt_index"], s["sample_index"]) for s in samples) == [
        (p, k) for p in range(3) for k in range(2)
    ]
    assert all(s["num_tokens"] <= 8 for s in samples)
    truncated = [s for s in samples if s["finish_reason"] == "length"]
    assert all(
        s["filters"]["max_length"] == "truncated at max_tokens" and not s["accepted"] for s in truncated
    )


def test_refused_sampling_settings_stop_the_run_without_retries(traces_recipe):
    """A refusal of the sampling settings (not of one prompt) is raised at once: retrying every prompt
    max_attempts times with back-off would only repeat it, for minutes."""
    from posttrain.generation.base import SamplingParams, SamplingRefused
    from posttrain.traces.pipeline import generate_with_retries

    class RefusingBackend:
        calls = 0

        def generate(self, prompt_ids, params):
            self.calls += 1
            raise SamplingRefused("seeded sampling is not available here")

    backend = RefusingBackend()
    recipe = traces_recipe("refused", run={"max_attempts": 3, "backoff_s": 600.0})
    with pytest.raises(SamplingRefused, match="seeded sampling"):
        generate_with_retries(backend, [[1, 2], [3, 4]], SamplingParams(seed=0), recipe)
    assert backend.calls == 1
