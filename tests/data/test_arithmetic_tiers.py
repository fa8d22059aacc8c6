"""The generated arithmetic task's two tiers and their rephrased held-out sets: answers recomputed from each
problem's parts, wordings kept apart, files reproducible."""

from __future__ import annotations

import json
import random
import re

import pytest

from posttrain.data import arithmetic as easy
from posttrain.data import arithmetic_hard as hard
from posttrain.data import arithmetic_rephrased as rephrased
from posttrain.data.arithmetic import generate_splits, problem_maker, rl_row, write_bundled_data
from posttrain.data.arithmetic_hard import DEFAULT_LEVEL, KINDS, LEVELS, Level, make_hard_problem

STEP = re.compile(r"^(?:[\w ]+: )?(\d+) ([-+*/]) (\d+) = (\d+)(?: remainder (\d+))?$")


def recompute(kind: str, f: dict[str, int]) -> int:
    """Each kind's answer from the quantities in its question, written out independently of the generator."""
    if kind == "change":
        return f["paid"] - f["q1"] * f["p1"] - f["q2"] * f["p2"]
    if kind == "packing":
        remaining = f["start"] + f["more"] - f["given"]
        return remaining % f["size"] if f["ask_left"] else remaining // f["size"]
    if kind == "factory":
        good = f["rate"] * f["hours"] + f["rate2"] * f["hours2"] - f["rejected"]
        return good // f["crate"]
    if kind == "trip":
        return f["trip"] - f["speed"] * f["hours"] - f["speed2"] * f["hours2"]
    if kind == "savings":
        money = f["wage"] * f["weeks"] + f["had"] - f["spent"]
        return money % f["price"] if f["ask_left"] else money // f["price"]
    if kind == "stock":
        return f["start"] - f["monday"] - f["tuesday"] + f["crates"] * f["per_crate"]
    if kind == "tickets":
        total = f["adults"] * f["adult_price"] + f["children"] * f["child_price"] - f["coupon"]
        assert total % f["friends"] == 0, f"tickets: {total} does not split among {f['friends']}"
        return total // f["friends"]
    raise AssertionError(f"unknown kind {kind}")


def check_step(line: str) -> None:
    match = STEP.match(line)
    assert match, f"step not in `a op b = c` form: {line!r}"
    a, op, b, result, remainder = match.groups()
    a, b, result = int(a), int(b), int(result)
    if op == "/":
        expected = divmod(a, b)
        assert (result, int(remainder or 0)) == expected, line
    else:
        assert result == {"+": a + b, "-": a - b, "*": a * b}[op], line


# Which of a level's ranges each quantity is drawn from (derived quantities, e.g. the amount paid, are left out).
RANGE_OF = {
    **dict.fromkeys(["q1", "q2", "hours", "hours2", "weeks", "crates", "adults", "children"], "count"),
    **dict.fromkeys(["p1", "p2", "rate", "rate2", "speed", "speed2", "wage", "price", "per_crate"], "price"),
    **dict.fromkeys(["adult_price", "child_price"], "price"),
    **dict.fromkeys(["more", "given", "rejected", "had", "spent", "monday", "tuesday"], "small"),
    "start": "stock",
    "size": "size",
    "crate": "size",
}


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_hard_answer_is_recomputed_from_the_problem_parts(level):
    rng = random.Random(7)
    problems = [make_hard_problem(rng, level) for _ in range(1500)]
    assert {p.kind for p in problems} == set(KINDS)
    ranges = LEVELS[level]
    for problem in problems:
        assert problem.answer == recompute(problem.kind, problem.facts), problem.question
        assert problem.answer >= 0 and 3 <= len(problem.steps) <= 5, problem.question
        for line in problem.steps:
            check_step(line)
        last = STEP.match(problem.steps[-1]).groups()
        assert problem.answer in (int(last[3]), int(last[4] or -1)), "the last step gives the answer"
        for key, value in problem.facts.items():  # every quantity the answer uses is stated in the question
            assert value in (0, 1) or re.search(rf"\b{value}\b", problem.question), (value, problem.question)
            if key in RANGE_OF:
                low, high = getattr(ranges, RANGE_OF[key])
                assert low <= value <= high, (level, key, value, problem.question)
        trace = problem.trace()
        assert trace.startswith("<think>\n") and trace.endswith(
            f"</think>\nThe answer is \\boxed{{{problem.answer}}}."
        )
    with_distractor = sum(
        re.search(r"years old|meters from|stickers|degrees|house number", p.question) is not None
        for p in problems
    )
    assert abs(with_distractor / len(problems) - ranges.distractor_rate) < 0.05
    remainders = [p for p in problems if " remainder " in p.steps[-1]]
    assert any(p.answer != 0 and p.facts.get("ask_left") for p in remainders)


def test_levels_grow_the_numbers():
    """A higher level draws from wider ranges, so its answers and intermediate results are larger."""
    medians = []
    for level in sorted(LEVELS):
        rng = random.Random(3)
        results = sorted(
            int(step.split(" = ")[1].split()[0])
            for _ in range(600)
            for step in make_hard_problem(rng, level).steps
        )
        medians.append(results[len(results) // 2])
    assert medians == sorted(medians) and medians[0] < medians[-1] / 2, medians
    with pytest.raises(ValueError, match=r"level: expected one of \[1, 2, 3\], got 4"):
        generate_splits(0, 5, 5, 5, difficulty="hard", level=4)
    with pytest.raises(ValueError, match="stock"):
        Level(price=(2, 9), count=(2, 3), stock=(20, 40), small=(2, 15), size=(2, 5), distractor_rate=0.1)


def test_generation_is_deterministic_by_seed():
    first = generate_splits(3, 50, 20, 10, difficulty="hard")
    assert first == generate_splits(3, 50, 20, 10, difficulty="hard")
    assert first != generate_splits(4, 50, 20, 10, difficulty="hard")
    questions = [json.dumps(row) for split in ("sft", "rl", "test") for row in first[split]]
    assert len(set(questions)) == len(questions) == 80
    # the SFT problems as prompts: the same questions, the answer their trace boxes
    for sft, prompt in zip(first["sft"], first["sft_prompts"], strict=True):
        assert prompt["prompt"] == sft["messages"][:2]
        assert sft["messages"][-1]["content"].endswith(f"\\boxed{{{prompt['answer']}}}.")
    with pytest.raises(ValueError, match="difficulty: expected 'easy' or 'hard', got 'medium'"):
        problem_maker("medium")


def test_bundled_files_are_regenerated_byte_for_byte(tmp_path, repo_root):
    """Both tiers' files (and the tokenizer trained on the easy tier) come out of `python -m
    posttrain.data.arithmetic` unchanged: adding the hard tier did not move the easy tier's random stream."""
    write_bundled_data(tmp_path, seed=0)
    write_bundled_data(tmp_path, seed=0, difficulty="hard")
    for tier in ("arith", "arith_hard"):
        for split in ("sft", "sft_prompts", "rl", "test"):
            written = (tmp_path / tier / f"{split}.jsonl").read_bytes()
            assert written == (repo_root / "data" / tier / f"{split}.jsonl").read_bytes(), f"{tier}/{split}"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tokenizer" / name).read_bytes() == (
            repo_root / "data/tokenizer" / name
        ).read_bytes()
    hard_test = [
        json.loads(line) for line in (repo_root / "data/arith_hard/test.jsonl").read_text().splitlines()
    ]
    assert len(hard_test) == 200 and set(hard_test[0]) == {"prompt", "answer"}


# Every generator's and every rephrased set's names and objects: what the held-out sets must not share.
NAMES = {
    "generators": {*easy.NAMES, *hard.NAMES},
    "rephrased": {*rephrased.NAMES, *rephrased.HARD_NAMES},
    "training": set(rephrased.TRAINING_WORDING.names),
}
OBJECTS = {
    "generators": {*easy.ITEMS, *hard.ITEMS, *(word for pair in hard.GOODS for word in pair)},
    "rephrased": {
        *rephrased.ITEMS,
        *rephrased.HARD_ITEMS,
        *(word for pair in rephrased.HARD_GOODS for word in pair),
    },
    "training": {
        *rephrased.TRAINING_WORDING.items,
        *(word for pair in rephrased.TRAINING_WORDING.goods for word in pair),
    },
}


def sentence_skeletons(question: str) -> set[str]:
    """The question's sentences with numbers, names and objects blanked: what a template fixes."""
    text = re.sub(r"\d+", "N", question)
    text = re.sub(r"\b(" + "|".join(set().union(*NAMES.values())) + r")\b", "NAME", text)
    text = re.sub(r"\b(" + "|".join(set().union(*OBJECTS.values())) + r")\b", "ITEM", text)
    return {s.strip() for s in re.split(r"(?<=[.?;])\s", text) if s.strip()}


def test_rephrased_set_asks_the_easy_operations_in_new_sentences(repo_root):
    rng = random.Random(0)
    generator_sentences = set().union(
        *(sentence_skeletons(easy.make_problem(rng).question) for _ in range(500))
    )
    assert len(generator_sentences) == 6  # 3 kinds x (statement, question)
    rng = random.Random(1)
    problems = [rephrased.make_rephrased_problem(rng) for _ in range(500)]
    formulas = {
        "add_then_give": lambda a, b, c: a + b - c,
        "groups_plus_extra": lambda a, b, c: a * b + c,
        "take_away": lambda a, b: a - b,
    }
    ranges = {  # the easy generator's number ranges
        "add_then_give": lambda a, b, c: 1 <= a <= 9 and 1 <= b <= 9 and 1 <= c < a + b,
        "groups_plus_extra": lambda a, b, c: 2 <= a <= 5 and 2 <= b <= 5 and 1 <= c <= 9,
        "take_away": lambda a, b: 5 <= a <= 19 and 1 <= b < a,
    }
    templates = set()
    for problem in problems:
        assert problem.answer == formulas[problem.kind](**problem.facts), problem.question
        assert ranges[problem.kind](**problem.facts), problem.question
        skeletons = sentence_skeletons(problem.question)
        assert not skeletons & generator_sentences, problem.question
        assert not re.search(r"\b(" + "|".join(easy.NAMES + easy.ITEMS) + r")\b", problem.question)
        templates.add(frozenset(skeletons))
    assert len(templates) == sum(len(t) for t in rephrased.TEMPLATES.values())
    lines = (repo_root / "data/arith/test_rephrased.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rephrased.rephrased_rows(seed=0)
    assert len(lines) == 200 and set(json.loads(lines[0])) == {"prompt", "answer"}
    held_out = {json.dumps(json.loads(line)["prompt"]) for line in lines}
    bundled = (repo_root / "data/arith/test.jsonl").read_text().splitlines()
    assert not held_out & {json.dumps(json.loads(line)["prompt"]) for line in bundled}


def test_hard_rephrased_set_asks_the_hard_kinds_in_new_sentences(repo_root):
    """The bundled level's kinds, numbers and steps in sentences, names and objects no generator uses."""
    assert not NAMES["generators"] & NAMES["rephrased"]
    assert not OBJECTS["generators"] & OBJECTS["rephrased"]
    assert not {*rephrased.NAMES, *rephrased.ITEMS} & {*rephrased.HARD_NAMES, *rephrased.HARD_ITEMS}
    rng = random.Random(0)
    generator_sentences = set().union(
        *(sentence_skeletons(make_hard_problem(rng).question) for _ in range(3000)),
        *(sentence_skeletons(easy.make_problem(rng).question) for _ in range(300)),
        *(sentence_skeletons(rephrased.make_rephrased_problem(rng).question) for _ in range(300)),
    )
    used_words = re.compile(r"\b(" + "|".join(NAMES["generators"] | OBJECTS["generators"]) + r")\b")
    problems = rephrased.rephrased_problems(seed=0, difficulty="hard")
    assert {p.kind for p in problems} == set(KINDS)
    ranges = LEVELS[DEFAULT_LEVEL]
    for problem in problems:
        assert problem.answer == recompute(problem.kind, problem.facts), problem.question
        assert 3 <= len(problem.steps) <= 5, problem.question
        for line in problem.steps:
            check_step(line)
        for key, value in problem.facts.items():
            assert value in (0, 1) or re.search(rf"\b{value}\b", problem.question), (value, problem.question)
            if key in RANGE_OF:
                low, high = getattr(ranges, RANGE_OF[key])
                assert low <= value <= high, (key, value, problem.question)
        skeletons = sentence_skeletons(problem.question)
        assert not skeletons & generator_sentences, problem.question
        assert not used_words.search(problem.question), problem.question
    assert any(re.search(r"months old|percent|number \d|pages|benches", p.question) for p in problems)
    lines = (repo_root / "data/arith_hard/test_rephrased.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [rl_row(problem) for problem in problems]
    assert len(lines) == 200 and set(json.loads(lines[0])) == {"prompt", "answer"}
    bundled = [json.loads(line)["prompt"] for line in (repo_root / "data/arith_hard/test.jsonl").open()]
    assert bundled[0][0] == json.loads(lines[0])["prompt"][0]  # the same system message
    assert not {json.dumps(json.loads(line)["prompt"]) for line in lines} & {json.dumps(p) for p in bundled}


def test_hard_training_wording_is_a_third_wording_of_the_same_problems(repo_root):
    """data/arith_hard/rl_varied.jsonl: the generator's kinds, numbers and answers in sentences, names, objects
    and distractors that neither the generator nor the held-out rephrased set uses."""
    for other in ("generators", "rephrased"):
        assert not NAMES["training"] & NAMES[other]
        assert not OBJECTS["training"] & OBJECTS[other]
    rng = random.Random(0)
    elsewhere = set().union(
        *(sentence_skeletons(make_hard_problem(rng).question) for _ in range(3000)),
        *(
            sentence_skeletons(p.question)
            for p in rephrased.rephrased_problems(seed=0, count=600, difficulty="hard")
        ),
    )
    problems = rephrased.rephrased_problems(seed=1, count=1000, difficulty="hard", wording="training")
    assert {p.kind for p in problems} == set(KINDS)
    others = NAMES["generators"] | NAMES["rephrased"] | OBJECTS["generators"] | OBJECTS["rephrased"]
    foreign = re.compile(r"\b(" + "|".join(others) + r")\b")
    for problem in problems:
        assert problem.answer == recompute(problem.kind, problem.facts), problem.question
        skeletons = sentence_skeletons(problem.question)
        assert not skeletons & elsewhere, (skeletons & elsewhere, problem.question)
        assert not foreign.search(problem.question), problem.question
    assert any(re.search(r"gears|years ago|minutes|queue|locker", p.question) for p in problems)
    lines = (repo_root / "data/arith_hard/rl_varied.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [rl_row(problem) for problem in problems]
    held_out = [
        json.dumps(json.loads(line)["prompt"])
        for name in ("test.jsonl", "test_rephrased.jsonl")
        for line in (repo_root / "data/arith_hard" / name).open()
    ]
    assert not {json.dumps(json.loads(line)["prompt"]) for line in lines} & set(held_out)
    with pytest.raises(ValueError, match="the easy tier has the held-out wording only"):
        rephrased.rephrased_problems(difficulty="easy", wording="training")
