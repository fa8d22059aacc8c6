"""Code rewards: the completion's last fenced code block runs in ``sandbox`` against the row's tests.

Nothing is executed in this process: ``sandbox.run`` starts an isolated program for every run. Two dataset
shapes are understood, per row:

* assert-style (HumanEval, MBPP): column ``tests`` holds Python test code, ``entry_point`` optionally the
  function that ``check(...)`` receives;
* stdin/stdout (competitive programming): column ``io_tests`` holds ``[{"input": ..., "output": ...}, ...]``.

A row with neither has no score (``None``). A completion without a code block scores 0.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.pool import cpu_count, in_worker
from rewards.registry import message_text, register

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def last_code_block(text: str) -> str | None:
    """The body of the last closed ```-fenced block (any language tag), or ``None``."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


def _test_spec(row: int, tests: str | None, entry_point: str | None, io_tests: list | None) -> Any:
    import sandbox

    if io_tests is not None:
        cases = []
        for case in io_tests:
            if not isinstance(case, dict) or not {"input", "output"} <= case.keys():
                raise ValueError(
                    f"row {row}: column 'io_tests' must hold {{'input': ..., 'output': ...}} dicts"
                )
            cases.append((case["input"], case["output"]))
        return sandbox.IOTests(cases)
    if tests is not None:
        return sandbox.AssertTests(tests, entry_point)
    return None


def _no_code(total: int) -> Any:
    import sandbox

    message = "no fenced code block in the completion"
    return sandbox.Result(
        status="error", exit_code=None, stdout="", stderr="", duration=0.0, total=total, message=message
    )


def run_tests(
    completions: list,
    tests: list | None = None,
    entry_point: list | None = None,
    io_tests: list | None = None,
    language: str = "python",
    **limits: Any,
) -> list[Any]:
    """The sandbox ``Result`` of each completion's code against its row's tests (a completion without a code
    block gets a failed Result that ran nothing); ``None`` where the row has no tests."""
    n = len(completions)
    for name, column in (("tests", tests), ("entry_point", entry_point), ("io_tests", io_tests)):
        if column is not None and len(column) != n:
            raise ValueError(f"code reward: column {name!r} has {len(column)} rows for {n} completions")
    jobs, where = [], []
    results: list[Any] = [None] * n
    for i, completion in enumerate(completions):
        spec = _test_spec(
            i, *(column[i] if column is not None else None for column in (tests, entry_point, io_tests))
        )
        if spec is None:
            continue
        source = last_code_block(message_text(completion))
        if source is None:
            results[i] = _no_code(spec.total)
            continue
        jobs.append({"source": source, "tests": spec, "language": language, **limits})
        where.append(i)
    if jobs:
        import sandbox

        if len(jobs) == 1 or in_worker():  # a pool worker is already one of several running side by side
            finished = [sandbox.run(**job) for job in jobs]
        else:
            with sandbox.Pool(min(len(jobs), cpu_count())) as pool:
                finished = pool.map(jobs)
        for i, result in zip(where, finished, strict=True):
            results[i] = result
    return results


@register("code_pass")
def code_pass(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """r = 1 if the program ran to the end and passed every test, else 0 (``None``: the row has no tests).

    Columns: ``tests`` and ``entry_point``, or ``io_tests``; other keywords are ``sandbox.run`` options:
    limits (``timeout``, ``memory_mb``, ...), ``language``, ``allow_weak_isolation``.
    """
    return [
        None if result is None else float(result.ok and result.passed == result.total)
        for result in run_tests(completions, **_known(columns))
    ]


@register("code_pass_fraction")
def code_pass_fraction(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """r = passed tests / total tests of the row (partial credit; ``None``: the row has no tests)."""
    return [
        None
        if result is None
        else (0.0 if result == "no code" or not result.total else result.passed / result.total)
        for result in run_tests(completions, **_known(columns))
    ]


_LIMIT_NAMES = ("timeout", "memory_mb", "processes", "output_bytes", "file_size_mb", "disk_mb", "open_files")


def _known(columns: dict[str, Any]) -> dict[str, Any]:
    """Keep the columns and options the code rewards read; other dataset columns (``answer``...) are ignored."""
    keep = ("tests", "entry_point", "io_tests", "language", "allow_weak_isolation", *_LIMIT_NAMES)
    return {key: value for key, value in columns.items() if key in keep}
