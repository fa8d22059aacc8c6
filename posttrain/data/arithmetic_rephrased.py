"""Second held-out sets for both tiers: the same kinds of problem and number ranges as data/arith and
data/arith_hard, asked in wordings and with names and objects the generators never use.

A model that scores well on a tier's test.jsonl but not on its test_rephrased.jsonl has learnt the generator's
sentences rather than the arithmetic. `python -m posttrain.data.arithmetic_rephrased` rewrites
data/arith/test_rephrased.jsonl and `python -m posttrain.data.arithmetic_rephrased --difficulty hard`
data/arith_hard/test_rephrased.jsonl, deterministically (same row format as test.jsonl: `prompt` messages and
`answer`). The hard set is sampled by the hard generator's own kinds at the bundled level, so its numbers,
steps and answers are the generator's; only the question is written anew from each problem's `facts`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from posttrain.data.arithmetic_hard import DEFAULT_LEVEL, KINDS, LEVELS
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

HARD_NAMES = [
    "Aiko", "Bilal", "Carmen", "Diego", "Elif", "Gustav", "Ingrid", "Jamal", "Kofi", "Lucia", "Mateo", "Nina",
    "Olga", "Rahul", "Signe", "Tariq", "Zanele", "Hiro",
]  # fmt: skip
HARD_GOODS = [  # (singular, plural); never after "a", which would need "an" for some
    ("teapot", "teapots"), ("blanket", "blankets"), ("umbrella", "umbrellas"), ("wallet", "wallets"),
    ("vase", "vases"), ("clock", "clocks"), ("basket", "baskets"), ("towel", "towels"),
]  # fmt: skip
HARD_ITEMS = ["spoons", "batteries", "buckets", "envelopes", "napkins", "brushes", "mittens", "lanterns"]
# Fields: the kind's `facts` (see posttrain.data.arithmetic_hard), {name}, {item}, {one}/{many} and
# {one2}/{many2} (two different goods), and {ask}, the question of the kinds that ask one of two things.
# The question is the last sentence, after ". ", where a distractor goes.
HARD_TEMPLATES = {
    "change": [
        "At the market {name} picks up {q1} {many} for {p1} dollars apiece and {q2} {many2} for {p2} dollars "
        "apiece, and pays {paid} dollars in cash. What change, in dollars, should {name} receive?",
        "{name} orders {q1} {many} (${p1} per {one}) and {q2} {many2} (${p2} per {one2}) and gives the "
        "cashier ${paid}. How much money does the cashier return?",
    ],
    "packing": [
        "{name} keeps {start} {item} in a cupboard, buys another {more} and donates {given} to the school "
        "fair. Everything still in the cupboard is sorted into cartons of {size}. {ask}",
        "Yesterday {name} counted {start} {item}. Today {more} more turned up and {given} went to a cousin. "
        "{name} fills cartons with all of them, {size} per carton. {ask}",
    ],
    "factory": [
        "{name}'s press produces {rate} {item} every hour for {hours} hours and then {rate2} every hour for "
        "the following {hours2} hours. Inspection removes {rejected} of them, and the rest are packed "
        "{crate} to a carton. How many cartons are completely full?",
        "A line supervised by {name} delivers {rate} {item} per hour over a {hours}-hour shift and {rate2} "
        "per hour over a second shift of {hours2} hours. Of these, {rejected} are defective and discarded. "
        "Every carton holds exactly {crate}. How many cartons can {name} fill to the top?",
    ],
    "trip": [
        "{name} plans a journey of {trip} km. The first leg takes {hours} hours at {speed} km an hour, and "
        "the second leg {hours2} hours at {speed2} km an hour. How many kilometres of the journey remain?",
        "The route {name} follows is {trip} km long. {name} travels for {hours} hours at an average of "
        "{speed} kilometres per hour and then for {hours2} hours at {speed2} kilometres per hour. What "
        "distance, in km, is left to cover?",
    ],
    "savings": [
        "{name} puts aside {wage} dollars each week for {weeks} weeks, on top of {had} dollars already in a "
        "piggy bank. A trip to the cinema costs {name} {spent} dollars. With what remains, {name} buys as "
        "many {many} at {price} dollars per {one} as possible. {ask}",
        "For {weeks} weeks {name} is paid ${wage} weekly for walking dogs, and had ${had} before that. After "
        "a ${spent} birthday present, {name} spends the money on {many} costing ${price} per {one}, buying "
        "the largest number possible. {ask}",
    ],
    "stock": [
        "A market stall run by {name} opens with {start} {item}. In the first hour {monday} are sold, in the "
        "second hour {tuesday} more, and then a van drops off {crates} boxes containing {per_crate} {item} "
        "apiece. How many {item} does the stall hold now?",
        "{name} counts {start} {item} on the storeroom shelves. Customers take {monday} on Thursday and "
        "{tuesday} on Friday, and on Saturday {crates} cartons arrive with {per_crate} {item} in each. What "
        "is the number of {item} on the shelves now?",
    ],
    "tickets": [
        "{name} and some friends, {friends} people in all, visit the zoo. They buy {adults} adult passes "
        "costing ${adult_price} each and {children} child passes costing ${child_price} each, then get "
        "${coupon} off with a discount code. If the {friends} of them split the total evenly, how much does "
        "each person pay, in dollars?",
        "Museum entry is ${adult_price} for an adult and ${child_price} for a child. {name} pays for "
        "{adults} adults and {children} children, takes {coupon} dollars off with a member discount, and the "
        "cost is divided equally among {friends} people. How many dollars is each person's part?",
    ],
}
HARD_ASKS = {  # by the fact `ask_left`: (the whole groups, what is left over)
    "packing": ("How many cartons end up full?", "How many {item} are left outside the full cartons?"),
    "savings": ("How many {many} does {name} get?", "How many dollars does {name} have after the purchase?"),
}
HARD_DISTRACTORS = [
    "{name} has a cat that is {n} months old.",
    "{name}'s phone battery was at {n} percent.",
    "The bus into town is number {n}.",
    "{name} read {n} pages of a novel that morning.",
    "The nearby park has {n} benches.",
]


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


def make_hard_rephrased_problem(rng: random.Random, level: int = DEFAULT_LEVEL) -> Problem:
    """A problem sampled by one of the hard generator's kinds at `level`, its question reworded; the steps
    lose the generator's labels, which name its objects."""
    numbers = LEVELS[level]
    name, kind = rng.choice(HARD_NAMES), rng.choice(sorted(HARD_TEMPLATES))
    _, steps, answer, facts = KINDS[kind](rng, name, numbers)
    (one, many), (one2, many2) = rng.sample(HARD_GOODS, 2)
    words = {
        "name": name,
        "item": rng.choice(HARD_ITEMS),
        "one": one,
        "many": many,
        "one2": one2,
        "many2": many2,
    }
    ask = HARD_ASKS[kind][facts["ask_left"]].format(**words) if kind in HARD_ASKS else ""
    question = rng.choice(HARD_TEMPLATES[kind]).format(**facts, **words, ask=ask)
    if rng.random() < numbers.distractor_rate:
        distractor = rng.choice(HARD_DISTRACTORS).format(name=name, n=rng.randint(11, 99))
        body, _, last_sentence = question.rpartition(". ")
        question = f"{body}. {distractor} {last_sentence}"
    steps = tuple(step.rpartition(": ")[2] for step in steps)
    return Problem(question, steps, answer, kind=kind, facts=facts)


MAKERS = {"easy": make_rephrased_problem, "hard": make_hard_rephrased_problem}


def rephrased_problems(seed: int = 0, count: int = 200, difficulty: str = "easy") -> list[Problem]:
    """`count` problems with distinct questions, the tier's held-out set for `seed`."""
    make, rng = MAKERS[difficulty], random.Random(seed)
    problems, seen = [], set()
    while len(problems) < count:
        problem = make(rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def rephrased_rows(seed: int = 0, count: int = 200, difficulty: str = "easy") -> list[dict]:
    return [rl_row(problem) for problem in rephrased_problems(seed, count, difficulty)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--difficulty", choices=sorted(MAKERS), default="easy")
    parser.add_argument("--out", help="default: the tier's data/arith*/test_rephrased.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tier = "arith" if args.difficulty == "easy" else f"arith_{args.difficulty}"
    with Path(args.out or f"data/{tier}/test_rephrased.jsonl").open("w") as handle:
        for row in rephrased_rows(args.seed, difficulty=args.difficulty):
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
