"""Starting the judge (`_judge`), in a jail or not, and collecting its report frames; and the check, once per
process, that every isolation layer of the jail works on this machine (a probe run in a real jail)."""

import functools
import json
import marshal
import os
import select
import shutil
import signal
import subprocess
import tempfile

from sandbox import isolation
from sandbox._judge.frames import encode_frame

MAX_MESSAGE = 2000
JAIL_END_TIMEOUT = 5.0


def launch(
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
    events, judge_stderr, timed_out = launch(header, b"", 30.0, 1, strong=True)
    done = [event for event in events if event[0] == "done"]
    if timed_out or not done:
        raise RuntimeError(f"the jail did not start: {judge_stderr.decode(errors='replace')[-MAX_MESSAGE:]}")
    return done[0][1]


@functools.cache
def isolation_report() -> isolation.IsolationReport:
    """Which layers work on this machine. Probes a real jail once per process (tens of milliseconds)."""
    layers: dict[str, str | None] = {
        "bubblewrap": None
        if isolation.bwrap_path()
        else "bwrap not found (Debian: apt-get install bubblewrap)",
        "dedicated_uid": None
        if os.geteuid() == 0
        else "not running as root: cannot switch each run to its own uid",
    }
    jail_layers = (
        "pid_namespace",
        "network_namespace",
        "private_files",
        "read_only_system",
        "undumpable_judge",
    )
    if not all(problem is None for problem in layers.values()):
        return isolation.IsolationReport(
            {**layers, **dict.fromkeys(jail_layers, "needs bubblewrap and root")}
        )
    try:
        facts = probe_jail()
    except Exception as exc:  # any failure to start the jail means none of its layers are there
        return isolation.IsolationReport({**layers, **dict.fromkeys(jail_layers, f"probe failed: {exc}")})
    layers["pid_namespace"] = None if facts["pid"] == 1 else f"judge has pid {facts['pid']}, not 1"
    layers["network_namespace"] = (
        None if facts["interfaces"] == ["lo"] else f"interfaces {facts['interfaces']}"
    )
    layers["private_files"] = None if not facts["visible"] else f"host paths visible: {facts['visible']}"
    layers["read_only_system"] = None if not facts["writable"] else f"writable: {facts['writable']}"
    layers["undumpable_judge"] = None if facts["undumpable"] else "the judge can be ptraced by the program"
    return isolation.IsolationReport(layers)


def require_isolation(allow_weak_isolation: bool) -> bool:
    """True when runs get the full jail; False when the caller accepted weak isolation; else IsolationError."""
    report = isolation_report()
    if report.ok:
        return True
    if isolation.weak_isolation_allowed(allow_weak_isolation):
        return False
    raise isolation.IsolationError(
        f"refusing to run untrusted code: missing isolation layer(s) {report.missing}.\n{report}\n"
        f"Pass allow_weak_isolation=True or set {isolation.WEAK_ISOLATION_ENV}=1 to run with rlimits, a process "
        "group and a scrubbed environment only."
    )
