"""`run`: one program, one jail. The parent side of the protocol in `_judge`."""

import json
import marshal
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

from sandbox import isolation
from sandbox._judge import encode_frame
from sandbox.spec import AssertTests, IOTests, Limits, Result, TestSpec

LANGUAGES = ("python",)
# Time the judge gets on top of the program's own limit to start up and report (a loaded machine included).
STARTUP_GRACE = 5.0
# Severity order when IO cases end differently: the first case with the worst status names the run's status.
SEVERITY = ("timeout", "memory", "output_limit", "error", "failed", "ok")
MAX_MESSAGE = 2000
JAIL_END_TIMEOUT = 5.0


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
    strong = isolation.require_isolation(allow_weak_isolation)

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
    events, judge_stderr, timed_out = _launch(header, after_header, deadline, limits.disk_mb, strong)
    duration = time.monotonic() - started
    if isinstance(tests, AssertTests):
        return _assert_result(events, judge_stderr, timed_out, tests, duration)
    return _program_result(events, judge_stderr, timed_out, tests, duration)


def probe_jail() -> dict:
    """Start a jail with the judge in probe mode and return what it saw (see `isolation_report`)."""
    header = {
        "mode": "probe",
        "hidden": [
            path
            for path in ("/etc", "/home", "/var", os.path.dirname(isolation.PACKAGE_DIR))
            if os.path.exists(path)
        ],
        "read_only": ["/", "/usr", isolation.python_prefix(), isolation.JAIL_PACKAGE],
    }
    events, judge_stderr, timed_out = _launch(header, b"", 30.0, 1, strong=True)
    done = [event for event in events if event[0] == "done"]
    if timed_out or not done:
        raise RuntimeError(f"the jail did not start: {judge_stderr.decode(errors='replace')[-MAX_MESSAGE:]}")
    return done[0][1]


def _limits_for_judge(limits: Limits) -> dict:
    fields = ("timeout", "memory_mb", "processes", "output_bytes", "file_size_mb", "open_files")
    return {name: getattr(limits, name) for name in fields}


def _launch(
    header: dict, after_header: bytes, deadline: float, disk_mb: int, strong: bool
) -> tuple[list, bytes, bool]:
    """Start the judge (jailed when `strong`), send it the header frame then `after_header`, and collect its
    report frames and its own stderr."""
    uid = isolation.uid_slots.acquire() if strong else -1
    workdir = None
    info_r, info_w = os.pipe() if strong else (-1, -1)
    try:
        if strong:
            header = dict(header, workdir=isolation.JAIL_WORKDIR, tmpdir=isolation.JAIL_TMPDIR)
            argv = isolation.jail_command(disk_mb, info_w) + isolation.judge_command(
                uid, isolation.JAIL_PACKAGE
            )
            env, cwd = {}, "/"
        else:
            workdir = tempfile.mkdtemp(prefix="sandbox-")
            tmpdir = os.path.join(workdir, "tmp")
            os.mkdir(tmpdir)
            header = dict(header, workdir=workdir, tmpdir=tmpdir)
            argv = isolation.judge_command(-1, isolation.PACKAGE_DIR)
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": tmpdir, "LANG": "C.UTF-8"}
            cwd = workdir
        payload = encode_frame(header) + after_header
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
            start_new_session=True, pass_fds=(info_w,) if strong else (),
        )  # fmt: skip
        if strong:
            os.close(info_w)
            info_w = -1
        timed_out = False
        try:
            out, err = process.communicate(payload, timeout=deadline)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_session(process.pid)
            out, err = process.communicate()
        _kill_session(process.pid)
        if strong:
            _await_jail_end(info_r)
        return _decode_frames(out), err, timed_out
    finally:
        for fd in (info_r, info_w):
            if fd >= 0:
                os.close(fd)
        if strong:
            isolation.uid_slots.release(uid)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _await_jail_end(info_r: int) -> None:
    """Wait until the jail's init is gone. bwrap's outer process exits as soon as the judge does, a moment
    before the kernel has killed the namespace's remaining processes; only the init's death marks that end."""
    os.set_blocking(info_r, False)
    try:
        init_pid = json.loads(os.read(info_r, 4096))["child-pid"]
        pidfd = os.pidfd_open(init_pid)
    except (BlockingIOError, ValueError, KeyError, ProcessLookupError):
        return  # bwrap never started the jail, or the init is already gone
    try:
        if not select.select([pidfd], [], [], JAIL_END_TIMEOUT)[0]:
            raise RuntimeError(f"the jail's init (pid {init_pid}) outlived its run by {JAIL_END_TIMEOUT} s")
    finally:
        os.close(pidfd)


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _decode_frames(data: bytes) -> list:
    events, offset = [], 0
    while offset + 4 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "little")
        if offset + 4 + size > len(data):
            break  # the judge died mid-frame
        events.append(marshal.loads(data[offset + 4 : offset + 4 + size]))
        offset += 4 + size
    return events


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
