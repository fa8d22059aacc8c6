"""A second held-out set for the easy tier: the same three operations and number ranges as data/arith, asked
in wordings and with names and objects the generator never uses.

A model that scores well on data/arith/test.jsonl but not here has learnt the generator's sentences rather
than the arithmetic. `python -m posttrain.data.arithmetic_rephrased` rewrites data/arith/test_rephrased.jsonl
deterministically (same row format as test.jsonl: `prompt` messages and `answer`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from posttrain.data.problems import Problem, rl_row

NAMES = ["Oskar", "Tara", "Malik", "Sofia", "Ravi", "Ines", "Yara", "Felix", "Noor", "Pablo", "Leila", "Theo"]
ITEMS = ["stickers", "pencils", "buttons", "cookies", "rocks", "ribbons", "beads", "balloons"]
# {a}, {b}, {c}: the numbers in the order the generator's kind uses them; {name}, {item} as above.
TEMPLATES = {
    "add_then_give": [
        "{name} started with {a} {item}. A friend gave {name} {b} more, and then {name} handed {c} to a "
        "classmate. How many {item} does {name} have now?",
        "There were {a} {item} in a jar. Someone put in {b} more, and later {c} were taken out. How many "
        "{item} are in the jar now?",
        "{name} collected {a} {item} on Monday and {b} on Tuesday, then lost {c} on the way home. How many "
        "{item} remain?",
    ],
    "groups_plus_extra": [
        "{name} has {a} bags, and each bag holds {b} {item}. There are also {c} loose {item}. How many {item} "
        "are there altogether?",
        "There are {a} rows of {item} with {b} in every row, plus {c} extra on the table. What is the total "
        "number of {item}?",
        "{name} buys {a} packs of {item}; each pack contains {b}. A friend adds {c} more. How many {item} does "
        "{name} end up with?",
    ],
    "take_away": [
        "{name} owned {a} {item}. After giving {b} away, how many {item} does {name} still own?",
        "A box held {a} {item}, and {b} of them were used for a craft project. How many {item} are still in "
        "the box?",
        "Of the {a} {item} that {name} bought, {b} were damaged. How many {item} are undamaged?",
    ],
}


def make_rephrased_problem(rng: random.Random) -> Problem:
    """The easy generator's ranges: a + b - c (a, b in 1..9, 1 <= c < a + b), a * b + c (a, b in 2..5, c in
    1..9), a - b (a in 5..19, 1 <= b < a)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.choice(sorted(TEMPLATES))
    if kind == "add_then_give":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = rng.randint(1, a + b - 1)
        steps, answer = (f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"), a + b - c
    elif kind == "groups_plus_extra":
        a, b, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 9)
        steps, answer = (f"{a} * {b} = {a * b}", f"{a * b} + {c} = {a * b + c}"), a * b + c
    else:
        a = rng.randint(5, 19)
        b, c = rng.randint(1, a - 1), None
        steps, answer = (f"{a} - {b} = {a - b}",), a - b
    question = rng.choice(TEMPLATES[kind]).format(name=name, item=item, a=a, b=b, c=c)
    facts = {"a": a, "b": b} if c is None else {"a": a, "b": b, "c": c}
    return Problem(question, steps, answer, kind=kind, facts=facts)


def rephrased_rows(seed: int = 0, count: int = 200) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        problem = make_rephrased_problem(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            rows.append(rl_row(problem))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="data/arith/test_rephrased.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with Path(args.out).open("w") as handle:
        for row in rephrased_rows(args.seed):
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
