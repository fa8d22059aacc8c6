import json
import re

import datasets
import pytest

from posttrain.evals.make_pairs import make_pairs
from posttrain.evals.pairs import Pair, load_pairs, sample_pairs
from posttrain.evals.scoring import SECTIONS

ROWS = [
    {
        "id": 7,
        "subset": "math-prm",
        "prompt": "What is 2 + 2?",
        "chosen": "4",
        "rejected": "5",
        "chosen_model": "x",
    },
    {"id": 8, "subset": "hep-python", "prompt": "Sum a list.", "chosen": "sum(xs)", "rejected": "max(xs)"},
]
EXPECTED = [
    Pair(id="7", subset="math-prm", prompt="What is 2 + 2?", chosen="4", rejected="5"),
    Pair(id="8", subset="hep-python", prompt="Sum a list.", chosen="sum(xs)", rejected="max(xs)"),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_format_loads_the_same_pairs(tmp_path):
    jsonl = _write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps(ROWS))
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "pairs.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"filtered": dataset, "raw": dataset.select([0])}).save_to_disk(
        str(tmp_path / "dict")
    )
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_jsonl(shards / "part-0.jsonl", ROWS[:1])
    datasets.Dataset.from_list(ROWS[1:]).to_parquet(str(shards / "part-1.parquet"))

    for source in (jsonl, as_json, tmp_path / "pairs.parquet", tmp_path / "saved", tmp_path / "dict", shards):
        assert load_pairs(source) == EXPECTED, source


def test_missing_id_defaults_to_row_index(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "id"} for row in ROWS]
    assert [p.id for p in load_pairs(_write_jsonl(tmp_path / "p.jsonl", rows))] == ["0", "1"]


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"subset": "math-prm", "prompt": "q", "chosen": "a"}, "line 2: missing field 'rejected'"),
        (
            {"subset": "math-prm", "prompt": "q", "chosen": 4, "rejected": "b"},
            "line 2: field 'chosen' must be a string",
        ),
        ({"subset": " ", "prompt": "q", "chosen": "a", "rejected": "b"}, "line 2: field 'subset' is empty"),
        ({"id": 7, "subset": "x", "prompt": "q", "chosen": "a", "rejected": "b"}, "line 2: duplicate id '7'"),
        (
            {"id": [1], "subset": "x", "prompt": "q", "chosen": "a", "rejected": "b"},
            "line 2: field 'id' must be",
        ),
        (["not", "an", "object"], "line 2: expected an object"),
    ],
)
def test_bad_row_names_file_row_and_field(tmp_path, bad_row, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], bad_row])
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_pairs(path)


def test_bad_files_are_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{broken}: line 3: invalid JSON")):
        load_pairs(broken)
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_pairs(_write_jsonl(tmp_path / "pairs.csv", ROWS))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pairs(tmp_path / "absent.jsonl")
    datasets.Dataset.from_list([{k: v for k, v in ROWS[0].items() if k != "prompt"}]).to_parquet(
        str(tmp_path / "no_prompt.parquet")
    )
    with pytest.raises(ValueError, match=re.escape("no_prompt.parquet: row 1: missing field 'prompt'")):
        load_pairs(tmp_path / "no_prompt.parquet")


def test_sample_is_seeded_and_keeps_file_order():
    pairs = [Pair(id=str(i), subset="s", prompt="p", chosen="a", rejected="b") for i in range(50)]
    sample = sample_pairs(pairs, 10, seed=3)
    assert sample == sample_pairs(pairs, 10, seed=3) != sample_pairs(pairs, 10, seed=4)
    assert len(sample) == 10 and [int(p.id) for p in sample] == sorted(int(p.id) for p in sample)
    assert sample_pairs(pairs, None, seed=0) == pairs == sample_pairs(pairs, 500, seed=0)


def test_bundled_pairs_are_the_generator_output(bundled_pairs):
    # data/rewardbench/pairs.jsonl is written by `python -m posttrain.evals.make_pairs`; it must not drift.
    rows = [json.loads(line) for line in bundled_pairs.read_text().splitlines()]
    assert rows == make_pairs(seed=0)
    pairs = load_pairs(bundled_pairs)
    for section, subsets in SECTIONS.items():
        in_section = [p for p in pairs if p.subset in subsets]
        assert 20 <= len(in_section) <= 40, section
        assert len({p.subset for p in in_section}) >= 2, section
    assert all(p.chosen != p.rejected for p in pairs)


def _final_number(text):
    return int(re.findall(r"-?\d+", text)[-1])


def test_bundled_preferences_are_right_by_construction(bundled_pairs):
    pairs = load_pairs(bundled_pairs)
    math = [p for p in pairs if p.subset == "math-prm"]
    for pair in math:
        a, b, c = map(int, re.findall(r"\d+", pair.prompt))
        assert _final_number(pair.chosen) == a * b + c
        assert _final_number(pair.rejected) != a * b + c
    code = [p for p in pairs if p.subset == "hep-python"]
    probes = ([3, -1, 4, 1, 5, 9, 2, 6, 5], [0, 2, 0, 7])
    for pair in code:
        name = re.search(r"`(\w+)\(xs\)`", pair.prompt).group(1)
        functions = []
        for source in (pair.chosen, pair.rejected):
            namespace = {}
            exec(source, namespace)
            functions.append(namespace[name])
        chosen, rejected = functions
        assert any(chosen(list(xs)) != rejected(list(xs)) for xs in probes), name
    lists = [p for p in pairs if p.subset == "llmbar-natural"]
    for pair in lists:
        n = int(re.search(r"exactly (\d+)", pair.prompt).group(1))
        assert len(pair.chosen.splitlines()) == n != len(pair.rejected.splitlines())
