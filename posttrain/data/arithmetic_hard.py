"""The hard tier of the generated arithmetic task: word problems of 3–5 steps.

Mixed operations (division with a remainder, change from a payment, rates), a distractor sentence with a
number that plays no part in the answer (in some problems), and several wordings per kind of problem. Each
problem keeps its `facts` (the quantities named in the question) and its `kind`, from which the answer can be
recomputed independently of the steps written in the trace.

The `level` (1-3) sets the number ranges and how often a distractor appears; the kinds and their steps are the
same at every level. Level 1 (one- and two-digit quantities; the bundled data/arith_hard/) is sized for
SmolLM2-135M-Instruct after its cold start, whose greedy steps on the 200 test problems were right for 97% of
the multiplications, 82% of the additions, 43% of the subtractions and 25% of the divisions: 20% of the problems
solved, room for RL. With two- and three-digit quantities (about level 3) the same model solved 10%: 47%, 68%,
10% and 6% of those steps. Levels 2 and 3 are for stronger models.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from posttrain.data.problems import Problem

NAMES = [
    "Amara", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ilya", "Jonas", "Keiko", "Luca",
    "Mira", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tomas", "Uma", "Vera", "Wen", "Yusuf",
]  # fmt: skip
GOODS = [  # (singular, plural) of things bought at a price
    ("notebook", "notebooks"), ("lamp", "lamps"), ("scarf", "scarves"), ("kite", "kites"), ("mug", "mugs"),
    ("backpack", "backpacks"), ("chair", "chairs"), ("puzzle", "puzzles"), ("plant", "plants"),
]  # fmt: skip
ITEMS = ["apples", "bolts", "candles", "eggs", "jars", "oranges", "soaps", "tiles", "toys", "bottles"]
DISTRACTORS = [
    "{name} is {n} years old.",
    "The shop is {n} meters from {name}'s home.",
    "{name} also owns {n} stickers.",
    "It was {n} degrees outside that day.",
    "{name}'s house number is {n}.",
]


@dataclass(frozen=True)
class Level:
    """The number ranges of one difficulty level (inclusive bounds)."""

    price: tuple[int, int]  # the multiplicands: prices, rates, speeds, wages
    count: tuple[int, int]  # the multipliers: quantities, hours, weeks
    stock: tuple[int, int]  # starting amounts
    small: tuple[int, int]  # amounts added, taken away, rejected or left to go
    size: tuple[int, int]  # divisors: box and crate sizes
    distractor_rate: float  # share of problems with a number that plays no part

    def __post_init__(self) -> None:
        if self.stock[0] <= 2 * self.small[1]:
            raise ValueError(f"Level: stock {self.stock} must start above two `small` amounts {self.small}")


LEVELS = {
    1: Level(price=(2, 12), count=(2, 5), stock=(20, 60), small=(2, 9), size=(2, 6), distractor_rate=0.2),
    2: Level(
        price=(11, 49), count=(2, 6), stock=(100, 399), small=(10, 49), size=(3, 12), distractor_rate=0.4
    ),
    3: Level(
        price=(12, 95), count=(2, 9), stock=(200, 899), small=(11, 99), size=(6, 30), distractor_rate=0.6
    ),
}
DEFAULT_LEVEL = 1

# What a kind makes: the question, the trace's steps, the answer and the quantities the answer is computed from.
Made = tuple[str, list[str], int, dict[str, int]]


def _draw(rng: random.Random, *ranges: tuple[int, int]) -> tuple[int, ...]:
    """One integer from each inclusive range, drawn in the order given (the order fixes the bundled files)."""
    return tuple(rng.randint(low, high) for low, high in ranges)


def _divide(total: int, size: int) -> tuple[int, int, str]:
    quotient, remainder = divmod(total, size)
    return quotient, remainder, f"{total} / {size} = {quotient} remainder {remainder}"


def change_from_payment(rng: random.Random, name: str, level: Level) -> Made:
    (one, many), (one2, many2) = rng.sample(GOODS, 2)
    q1, p1, q2, p2 = _draw(rng, level.count, level.price, level.count, level.price)
    cost = q1 * p1 + q2 * p2
    paid = (cost // 10 + rng.randint(1, 5)) * 10  # a round sum above the cost
    question = rng.choice(
        [
            f"{name} buys {q1} {many} at ${p1} each and {q2} {many2} at ${p2} each, paying with ${paid}. "
            f"How many dollars of change does {name} get?",
            f"A {one} costs {p1} dollars and a {one2} costs {p2} dollars. {name} takes {q1} {many} and {q2} "
            f"{many2} to the till and hands over {paid} dollars. How much change comes back, in dollars?",
            f"{name} has ${paid} and spends some of it on {q1} {many} priced at ${p1} apiece and {q2} {many2} priced "
            f"at ${p2} apiece. How many dollars are left?",
        ]
    )
    steps = [
        f"{many}: {q1} * {p1} = {q1 * p1}",
        f"{many2}: {q2} * {p2} = {q2 * p2}",
        f"total cost: {q1 * p1} + {q2 * p2} = {cost}",
        f"change: {paid} - {cost} = {paid - cost}",
    ]
    return question, steps, paid - cost, {"q1": q1, "p1": p1, "q2": q2, "p2": p2, "paid": paid}


def packing_with_remainder(rng: random.Random, name: str, level: Level) -> Made:
    item = rng.choice(ITEMS)
    start, more, given, size = _draw(rng, level.stock, level.small, level.small, level.size)
    total = start + more - given
    full, left, division = _divide(total, size)
    ask_left = rng.random() < 0.5
    ask = f"how many {item} are left over" if ask_left else "how many full boxes can be packed"
    question = rng.choice(
        [
            f"{name} has {start} {item}, receives {more} more and gives {given} to a neighbour. The rest go "
            f"into boxes of {size}. {ask[0].upper() + ask[1:]}?",
            f"A store room holds {start} {item}. A delivery adds {more}, then {given} are sold. {name} packs "
            f"what remains in boxes that take {size} each. {ask[0].upper() + ask[1:]}?",
        ]
    )
    steps = [f"{start} + {more} = {start + more}", f"{start + more} - {given} = {total}", division]
    answer = left if ask_left else full
    facts = {"start": start, "more": more, "given": given, "size": size, "ask_left": int(ask_left)}
    return question, steps, answer, facts


def factory_rate(rng: random.Random, name: str, level: Level) -> Made:
    item = rng.choice(ITEMS)
    rate, hours, rate2, hours2 = _draw(rng, level.price, level.count, level.price, level.count)
    made, made2 = rate * hours, rate2 * hours2
    rejected = rng.randint(level.small[0], min(level.small[1], (made + made2) // 2))
    crate = rng.randint(*level.size)
    good = made + made2 - rejected
    full, _, division = _divide(good, crate)
    question = rng.choice(
        [
            f"A machine run by {name} makes {rate} {item} per hour for {hours} hours, then {rate2} per hour "
            f"for {hours2} more hours. {rejected} of them fail the check. The good ones are shipped in crates "
            f"of {crate}. How many crates can be filled completely?",
            f"In the morning {name}'s workshop turns out {rate} {item} an hour for {hours} hours; in the "
            f"afternoon, {rate2} an hour for {hours2} hours. After throwing away {rejected} faulty ones, "
            f"{name} fills crates holding {crate} each. How many full crates are there?",
        ]
    )
    steps = [
        f"morning: {rate} * {hours} = {made}",
        f"afternoon: {rate2} * {hours2} = {made2}",
        f"{made} + {made2} = {made + made2}",
        f"good ones: {made + made2} - {rejected} = {good}",
        f"crates: {division}",
    ]
    facts = {"rate": rate, "hours": hours, "rate2": rate2, "hours2": hours2, "rejected": rejected}
    return question, steps, full, {**facts, "crate": crate}


def trip_distance(rng: random.Random, name: str, level: Level) -> Made:
    speed, hours, speed2, hours2 = _draw(rng, level.price, level.count, level.price, level.count)
    driven = speed * hours + speed2 * hours2
    trip = driven + rng.randint(*level.small)
    question = rng.choice(
        [
            f"{name} is driving {trip} km. {name} drives at {speed} km per hour for {hours} hours, then at "
            f"{speed2} km per hour for {hours2} hours. How many km are still to go?",
            f"A trip is {trip} kilometres long. The first {hours} hours go at {speed} km/h and the next "
            f"{hours2} hours at {speed2} km/h. How far is {name} from the end of the trip, in km?",
        ]
    )
    steps = [
        f"first part: {speed} * {hours} = {speed * hours}",
        f"second part: {speed2} * {hours2} = {speed2 * hours2}",
        f"driven: {speed * hours} + {speed2 * hours2} = {driven}",
        f"still to go: {trip} - {driven} = {trip - driven}",
    ]
    facts = {"speed": speed, "hours": hours, "speed2": speed2, "hours2": hours2, "trip": trip}
    return question, steps, trip - driven, facts


def savings(rng: random.Random, name: str, level: Level) -> Made:
    one, many = rng.choice(GOODS)
    wage, weeks, had = _draw(rng, level.price, level.count, level.small)
    spent = rng.randint(level.small[0], min(level.small[1], (wage * weeks + had) // 2))
    price = rng.randint(*level.price)
    money = wage * weeks + had - spent
    count, left, division = _divide(money, price)
    ask_left = rng.random() < 0.5
    ask = "How many dollars are left after that?" if ask_left else f"How many {many} can {name} buy?"
    question = rng.choice(
        [
            f"{name} earns ${wage} a week for {weeks} weeks and already had ${had}. After spending ${spent} "
            f"on food, {name} buys as many {many} at ${price} each as possible. {ask}",
            f"{name} had {had} dollars saved, then got {wage} dollars every week for {weeks} weeks and paid "
            f"{spent} dollars for a bus pass. A {one} costs {price} dollars and {name} buys as many as the "
            f"money allows. {ask}",
        ]
    )
    steps = [
        f"earned: {wage} * {weeks} = {wage * weeks}",
        f"{wage * weeks} + {had} = {wage * weeks + had}",
        f"{wage * weeks + had} - {spent} = {money}",
        f"{many}: {division}",
    ]
    facts = {
        "wage": wage,
        "weeks": weeks,
        "had": had,
        "spent": spent,
        "price": price,
        "ask_left": int(ask_left),
    }
    return question, steps, left if ask_left else count, facts


def stock_count(rng: random.Random, name: str, level: Level) -> Made:
    item = rng.choice(ITEMS)
    start, monday, tuesday, crates, per_crate = _draw(
        rng, level.stock, level.small, level.small, level.count, level.price
    )
    question = rng.choice(
        [
            f"{name}'s shop starts the week with {start} {item}. It sells {monday} on Monday and {tuesday} on "
            f"Tuesday, and on Wednesday {crates} crates of {per_crate} {item} arrive. How many {item} does "
            "the shop have now?",
            f"There are {start} {item} in {name}'s warehouse. {monday} are shipped out, then {tuesday} more, "
            f"and then {crates} crates holding {per_crate} each come in. How many {item} are in the warehouse?",
        ]
    )
    after = start - monday - tuesday
    steps = [
        f"{start} - {monday} = {start - monday}",
        f"{start - monday} - {tuesday} = {after}",
        f"arrived: {crates} * {per_crate} = {crates * per_crate}",
        f"{after} + {crates * per_crate} = {after + crates * per_crate}",
    ]
    facts = {"start": start, "monday": monday, "tuesday": tuesday, "crates": crates, "per_crate": per_crate}
    return question, steps, after + crates * per_crate, facts


def shared_tickets(rng: random.Random, name: str, level: Level) -> Made:
    adults, adult_price, children, child_price = _draw(
        rng, level.count, level.price, level.count, level.price
    )
    friends = rng.randint(2, 6)
    total = adults * adult_price + children * child_price
    coupon = rng.randint(level.small[0], min(level.small[1], total // 2))
    coupon += (total - coupon) % friends  # the rest splits evenly
    share = (total - coupon) // friends
    question = rng.choice(
        [
            f"{name} buys {adults} adult tickets at ${adult_price} and {children} child tickets at "
            f"${child_price}, and uses a ${coupon} coupon. The cost is split equally among {friends} friends. "
            "How many dollars does each friend pay?",
            f"Adult tickets cost {adult_price} dollars and child tickets {child_price} dollars. A group of "
            f"{friends} friends, {name} among them, buys {adults} adult and {children} child tickets, takes "
            f"{coupon} dollars off with a voucher, and shares the bill equally. What is each share, in dollars?",
        ]
    )
    steps = [
        f"adults: {adults} * {adult_price} = {adults * adult_price}",
        f"children: {children} * {child_price} = {children * child_price}",
        f"{adults * adult_price} + {children * child_price} = {total}",
        f"{total} - {coupon} = {total - coupon}",
        f"{total - coupon} / {friends} = {share}",
    ]
    facts = {"adults": adults, "adult_price": adult_price, "children": children, "child_price": child_price}
    return question, steps, share, {**facts, "coupon": coupon, "friends": friends}


KINDS: dict[str, Callable[[random.Random, str, Level], Made]] = {
    "change": change_from_payment,
    "packing": packing_with_remainder,
    "factory": factory_rate,
    "trip": trip_distance,
    "savings": savings,
    "stock": stock_count,
    "tickets": shared_tickets,
}


def make_hard_problem(rng: random.Random, level: int = DEFAULT_LEVEL) -> Problem:
    """One problem of a random kind at `level` (1-3, see LEVELS)."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {sorted(LEVELS)}, got {level!r}")
    numbers = LEVELS[level]
    name, kind = rng.choice(NAMES), rng.choice(sorted(KINDS))
    question, steps, answer, facts = KINDS[kind](rng, name, numbers)
    if rng.random() < numbers.distractor_rate:  # a number that plays no part: choose what to compute with
        distractor = rng.choice(DISTRACTORS).format(name=name, n=rng.randint(11, 99))
        body, _, ask = question.rpartition(". ")
        question = f"{body}. {distractor} {ask}"
    return Problem(question, tuple(steps), answer, kind=kind, facts=facts)
