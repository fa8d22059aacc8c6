"""`run`: one program, one jail. The parent side of the protocol in `_judge`: what to ask the judge, and the
verdict made of its reports (`launch` starts it)."""

import time

from sandbox._judge.frames import encode_frame
from sandbox.launch import MAX_MESSAGE, launch, require_isolation
from sandbox.spec import AssertTests, IOTests, Limits, Result, TestSpec

LANGUAGES = ("python",)
# Time the judge gets on top of the program's own limit to start up and report (a loaded machine included).
STARTUP_GRACE = 5.0
# Severity order when IO cases end differently: the first case with the worst status names the run's status.
SEVERITY = ("timeout", "memory", "output_limit", "error", "failed", "ok")


def run(
    source: str,
    *,
    tests: TestSpec | None = None,
    stdin: str | None = None,
    language: str = "python",
    limits: Limits | None = None,
    allow_weak_isolation: bool = False,
    **limit_overrides: float,
) -> Result:
    """Run untrusted `source` in a fresh jail and judge it.

    Without tests the run is `python solution.py` fed `stdin`; status "ok" means exit code 0. With AssertTests
    the program's definitions are loaded and the tests call them from another process; with IOTests the
    program runs once per case and the parent compares its stdout. Limits come from `limits` (default
    Limits()) with `limit_overrides` applied, e.g. `run(src, timeout=2)`. Raises IsolationError when an
    isolation layer is missing and weak isolation was not allowed.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    if language not in LANGUAGES:
        raise ValueError(f"language {language!r} is not supported; supported: {list(LANGUAGES)}")
    if tests is not None and not isinstance(tests, AssertTests | IOTests):
        raise TypeError(f"tests must be AssertTests or IOTests, got {type(tests).__name__}")
    if stdin is not None and tests is not None:
        raise ValueError("stdin is for runs without tests; IOTests carry their own stdin per case")
    limits = (limits or Limits()).replace(**limit_overrides)
    strong = require_isolation(allow_weak_isolation)

    header = {"source": source, "limits": _limits_for_judge(limits)}
    if isinstance(tests, AssertTests):
        header.update(mode="assert", entry_point=tests.entry_point, total=tests.total)
        after_header = encode_frame(list(tests.statements))
        deadline = limits.timeout + STARTUP_GRACE
    else:
        inputs = [case[0] for case in tests.cases] if tests else [stdin or ""]
        header.update(mode="program", inputs=[text.encode() for text in inputs], own_uid=strong)
        after_header = b""
        deadline = limits.timeout * len(inputs) + STARTUP_GRACE

    started = time.monotonic()
    events, judge_stderr, timed_out = launch(header, after_header, deadline, limits.disk_mb, strong)
    duration = time.monotonic() - started
    if isinstance(tests, AssertTests):
        return _assert_result(events, judge_stderr, timed_out, tests, duration)
    return _program_result(events, judge_stderr, timed_out, tests, duration)


def _limits_for_judge(limits: Limits) -> dict:
    fields = ("timeout", "memory_mb", "processes", "output_bytes", "file_size_mb", "open_files")
    return {name: getattr(limits, name) for name in fields}


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _judge_failure(judge_stderr: bytes, timed_out: bool) -> tuple[str, str]:
    if timed_out:
        return "timeout", "the sandbox ran past its deadline and was killed"
    tail = _text(judge_stderr)[-MAX_MESSAGE:].strip()
    return "error", "the sandbox's judge ended without a verdict" + (f": {tail}" if tail else "")


def _assert_result(
    events: list, judge_stderr: bytes, timed_out: bool, tests: AssertTests, duration: float
) -> Result:
    passed = sum(1 for event in events if event[0] == "test" and event[2])
    done = next((event[1] for event in events if event[0] == "done"), None)
    if done is None:
        status, message = _judge_failure(judge_stderr, timed_out)
        return Result(status, None, "", "", duration, passed, tests.total, message)
    return Result(
        done["status"], done["exit_code"], _text(done["stdout"]), _text(done["stderr"]), duration, passed,
        tests.total, done["message"][:MAX_MESSAGE],
    )  # fmt: skip


def _program_result(
    events: list, judge_stderr: bytes, timed_out: bool, tests: IOTests | None, duration: float
) -> Result:
    cases = [event[1] for event in events if event[0] == "case"]
    finished = any(event[0] == "done" for event in events)
    total = tests.total if tests else 0
    if not finished and len(cases) < max(total, 1):
        status, message = _judge_failure(judge_stderr, timed_out)
        return Result(status, None, "", "", duration, 0, total, message)
    verdicts = []
    for index, case in enumerate(cases):
        stdout = _text(case["stdout"])
        status = case["status"]
        if tests and status == "ok" and not tests.matches(stdout, tests.cases[index][1]):
            status = "failed"
        verdicts.append(status)
    worst = min(range(len(cases)), key=lambda index: (SEVERITY.index(verdicts[index]), index))
    case = cases[worst]
    passed = verdicts.count("ok") if tests else 0
    message = "" if verdicts[worst] == "ok" else f"case {worst}: {verdicts[worst]}" if tests else ""
    return Result(
        verdicts[worst], case["exit_code"], _text(case["stdout"]), _text(case["stderr"]), duration, passed, total,
        message,
    )  # fmt: skip
