"""Second held-out sets for both tiers: the same kinds of problem and number ranges as data/arith and
data/arith_hard, asked in wordings and with names and objects the generators never use.

A model that scores well on a tier's test.jsonl but not on its test_rephrased.jsonl has learnt the generator's
sentences rather than the arithmetic. `python -m posttrain.data.arithmetic_rephrased` rewrites
data/arith/test_rephrased.jsonl and `python -m posttrain.data.arithmetic_rephrased --difficulty hard`
data/arith_hard/test_rephrased.jsonl, deterministically (same row format as test.jsonl: `prompt` messages and
`answer`). The hard set is sampled by the hard generator's own kinds at the bundled level, so its numbers,
steps and answers are the generator's; only the question is written anew from each problem's `facts`.

The hard tier has a second, disjoint wording for training (`TRAINING_WORDING`: other sentences, names, objects
and distractors than both the generator's and the held-out set's): `--wording training --count 1000 --seed 1`
writes data/arith_hard/rl_varied.jsonl, RL prompts that ask the generator's problems in new words. Whether RL on
more than one wording carries to a wording never trained on is what the held-out set then measures.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Wording:
    """How the hard kinds are asked: names, objects, a kind's question templates, the asks of the kinds that ask
    one of two things, and distractor sentences (fields as in HARD_TEMPLATES)."""

    names: list[str]
    goods: list[tuple[str, str]]
    items: list[str]
    templates: dict[str, list[str]]
    asks: dict[str, tuple[str, str]]
    distractors: list[str]


HELD_OUT_WORDING = Wording(HARD_NAMES, HARD_GOODS, HARD_ITEMS, HARD_TEMPLATES, HARD_ASKS, HARD_DISTRACTORS)
TRAINING_WORDING = Wording(
    names=[
        "Anouk", "Bram", "Cosmin", "Delia", "Eero", "Freya", "Gael", "Hamid", "Isla", "Joaquin", "Kaia",
        "Lars", "Maren", "Nico", "Paz", "Rafael",
    ],
    goods=[
        ("helmet", "helmets"), ("jacket", "jackets"), ("pillow", "pillows"), ("kettle", "kettles"),
        ("mirror", "mirrors"), ("shovel", "shovels"), ("ladder", "ladders"), ("hammer", "hammers"),
    ],
    items=["pebbles", "corks", "washers", "badges", "coasters", "feathers", "magnets", "hooks"],
    templates={
        "change": [
            "{name} needs {q1} {many} and {q2} {many2} for a new flat. Each {one} is ${p1} and each {one2} is "
            "${p2}. {name} pays with {paid} dollars. How many dollars should {name} get back?",
            "In a hardware shop {q1} {many} cost ${p1} per piece and {q2} {many2} cost ${p2} per piece. {name} "
            "buys them all and hands over ${paid}. What is the change in dollars?",
        ],
        "packing": [
            "On Monday {name} had {start} {item}. A parcel brought {more} more, and {name} lent {given} to a "
            "teammate. {name} then bundles all of them in groups of {size}. {ask}",
            "A drawer contains {start} {item}. {name} adds {more} and takes out {given}. All the {item} in the "
            "drawer are then put in bags of {size}. {ask}",
        ],
        "factory": [
            "A machine in {name}'s workshop makes {rate} {item} per hour for {hours} hours and {rate2} per hour "
            "for another {hours2} hours. {name} throws away {rejected} faulty ones and packs the others in sets "
            "of {crate}. How many complete sets does {name} pack?",
            "During the morning {name}'s team makes {rate} {item} each hour for {hours} hours; in the afternoon "
            "it makes {rate2} each hour for {hours2} hours. After {rejected} are rejected, the rest are boxed "
            "{crate} per box. How many boxes are filled completely?",
        ],
        "trip": [
            "{name} is cycling a {trip} km trail. {name} rides {hours} hours at {speed} km per hour, rests, "
            "and rides {hours2} more hours at {speed2} km per hour. How many km of the trail are still ahead?",
            "A delivery van driven by {name} must cover {trip} kilometres. It goes {speed} km/h for {hours} "
            "hours and then {speed2} km/h for {hours2} hours. How many kilometres does it still have to drive?",
        ],
        "savings": [
            "{name} earns {wage} dollars a week from a paper round and has done it for {weeks} weeks, on top "
            "of {had} dollars saved earlier. A video game cost {name} {spent} dollars. {name} now buys {many} "
            "at {price} dollars each, as many as the money allows. {ask}",
            "Over {weeks} weeks {name} gets ${wage} per week in pocket money, adding to ${had} from before. "
            "After paying ${spent} for a concert ticket, {name} uses the rest to buy as many {many} as possible "
            "at ${price} per {one}. {ask}",
        ],
        "stock": [
            "The club room of {name}'s team held {start} {item} in the morning. {monday} were borrowed before "
            "lunch and {tuesday} after lunch, and then {crates} parcels with {per_crate} {item} each were added. "
            "How many {item} does the club room hold now?",
            "{name}'s kiosk stocks {start} {item} at dawn. By noon it has sold {monday}, by evening another "
            "{tuesday}, and at closing {crates} packages holding {per_crate} {item} each are delivered. How "
            "many {item} are in the kiosk after the delivery?",
        ],
        "tickets": [
            "{name} organises a concert outing for {friends} people, {name} included. They need {adults} adult "
            "seats at ${adult_price} each and {children} student seats at ${child_price} each, and a voucher "
            "takes ${coupon} off. The bill is shared equally. What is each person's share in dollars?",
            "Swimming pool tickets cost {adult_price} dollars for adults and {child_price} dollars for "
            "children. {name} buys {adults} adult and {children} child tickets and uses a {coupon}-dollar "
            "voucher, and the {friends} people in the group share the cost equally. What does each one of them "
            "pay, in dollars?",
        ],
    },
    asks={
        "packing": ("How many complete groups are there?", "How many {item} are not in a complete group?"),
        "savings": ("How many {many} can {name} afford?", "How many dollars does {name} keep after buying them?"),
    },
    distractors=[
        "{name}'s bike has {n} gears.",
        "The shop opened {n} years ago.",
        "{name} walked for {n} minutes to get there.",
        "There were {n} people in the queue.",
        "{name}'s locker is number {n}.",
    ],
)  # fmt: skip
WORDINGS = {"held_out": HELD_OUT_WORDING, "training": TRAINING_WORDING}


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


def make_hard_rephrased_problem(
    rng: random.Random, level: int = DEFAULT_LEVEL, wording: Wording = HELD_OUT_WORDING
) -> Problem:
    """A problem sampled by one of the hard generator's kinds at `level`, its question asked in `wording`; the
    steps lose the generator's labels, which name its objects."""
    numbers = LEVELS[level]
    name, kind = rng.choice(wording.names), rng.choice(sorted(wording.templates))
    _, steps, answer, facts = KINDS[kind](rng, name, numbers)
    (one, many), (one2, many2) = rng.sample(wording.goods, 2)
    words = {
        "name": name,
        "item": rng.choice(wording.items),
        "one": one,
        "many": many,
        "one2": one2,
        "many2": many2,
    }
    ask = wording.asks[kind][facts["ask_left"]].format(**words) if kind in wording.asks else ""
    question = rng.choice(wording.templates[kind]).format(**facts, **words, ask=ask)
    if rng.random() < numbers.distractor_rate:
        distractor = rng.choice(wording.distractors).format(name=name, n=rng.randint(11, 99))
        body, _, last_sentence = question.rpartition(". ")
        question = f"{body}. {distractor} {last_sentence}"
    steps = tuple(step.rpartition(": ")[2] for step in steps)
    return Problem(question, steps, answer, kind=kind, facts=facts)


def rephrased_problems(
    seed: int = 0, count: int = 200, difficulty: str = "easy", wording: str = "held_out"
) -> list[Problem]:
    """`count` problems with distinct questions: the tier's held-out set for `seed`, or with the hard tier's
    training wording, RL prompts."""
    if difficulty == "easy" and wording != "held_out":
        raise ValueError("the easy tier has the held-out wording only")
    rng = random.Random(seed)
    problems, seen = [], set()
    while len(problems) < count:
        if difficulty == "easy":
            problem = make_rephrased_problem(rng)
        else:
            problem = make_hard_rephrased_problem(rng, wording=WORDINGS[wording])
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def rephrased_rows(
    seed: int = 0, count: int = 200, difficulty: str = "easy", wording: str = "held_out"
) -> list[dict]:
    return [rl_row(problem) for problem in rephrased_problems(seed, count, difficulty, wording)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--difficulty", choices=["easy", "hard"], default="easy")
    parser.add_argument("--wording", choices=sorted(WORDINGS), default="held_out")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--out", help="default: the tier's data/arith*/test_rephrased.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tier = "arith" if args.difficulty == "easy" else f"arith_{args.difficulty}"
    with Path(args.out or f"data/{tier}/test_rephrased.jsonl").open("w") as handle:
        for row in rephrased_rows(args.seed, args.count, args.difficulty, args.wording):
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
