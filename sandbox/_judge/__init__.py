"""The trusted half of a sandboxed run. It starts first inside the jail, runs the program in a forked child and
reports what happened to the parent (`sandbox.runner`) over its stdout pipe.

It imports only the standard library: inside the jail nothing else is visible. Parent and judge talk in
length-prefixed marshal frames:

  parent -> judge (stdin):   the header frame, then, for assert tests, the tests frame
  judge -> parent (stdout):  ("case", outcome) per program run, ("test", index, passed) per test, and
                             ("done", summary) last

Why the program cannot forge a verdict:
- the judge drops to the run's unprivileged uid before anything else; the uid change makes it non-dumpable, so
  the program (same uid, no capabilities) can neither ptrace it nor open its /proc files, memory or pipes;
  as the PID namespace's init it cannot even be signalled by the program;
- for assert tests the program's child is forked *before* the tests are read, so the tests are never in its
  memory nor on its filesystem;
- the program answers calls only with plain data (marshal of numbers, strings, containers), re-checked on
  arrival, so a returned object cannot carry its own `__eq__`; patching its own builtins changes nothing in
  the judge, and its top-level names never shadow the builtins the tests use (its own `abs` stays its own);
- the judge counts passes itself: exit codes, printed markers and early exits mean nothing.

Here: `main` and the three modes (program runs, assert tests in `assertions`, the jail probe); `frames` is the
wire format; `program` is what runs in the program's forked process; `child` is the judge's handle on it.
Inside the jail this package is imported as the top-level `_judge` (the sandbox directory goes first on the
path, see `isolation.BOOT`), in the parent as `sandbox._judge`: hence the relative imports.
"""

# Every millisecond of start-up is paid per run: the judge avoids modules with costly imports (selectors,
# signal, threading, traceback pull in collections, enum, functools, re).
import os
import sys

from .assertions import judge_assertions
from .child import SIGKILL, Child, exit_verdict
from .frames import REPORT_FD, read_frame, report
from .program import run_as_main, spawn


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    # The uid change must have made us non-dumpable: /proc/self is then owned by root, not by us.
    if os.stat("/proc/self/status").st_uid == uid:
        raise RuntimeError("the judge is still dumpable after dropping privileges; refusing to run")


def make_undumpable() -> None:
    """Without a uid change (weak isolation), ask the kernel directly: PR_SET_DUMPABLE = 4."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def clear_dir(path: str) -> None:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            clear_dir(entry.path)
            os.rmdir(entry.path)
        else:
            os.unlink(entry.path)


def forget_previous_run(header: dict) -> None:
    """Nothing from the previous run may touch the next: kill whatever it left behind, reap it (as the
    namespace's init the judge inherits orphans, and zombies still count against the process limit), and
    empty the directories it could write. kill(-1) reaches every process of our uid but us, so it is only
    done when that uid belongs to this run alone."""
    if header["own_uid"]:
        try:
            os.kill(-1, SIGKILL)
        except ProcessLookupError:
            pass
        try:
            while True:
                os.waitpid(-1, 0)
        except ChildProcessError:
            pass
    for path in (header["workdir"], header["tmpdir"]):
        clear_dir(path)


def judge_program(header: dict) -> None:
    """Run the program once per stdin input; the parent compares outputs, so expected outputs never get here."""
    limits = header["limits"]
    for index, data in enumerate(header["inputs"]):
        if index:
            forget_previous_run(header)
        stdin_r, stdin_w = os.pipe()
        pid, out_r, err_r = spawn(limits, stdin_r)
        if pid == 0:
            run_as_main(header["source"], header["workdir"])
        os.close(stdin_r)
        child = Child(pid, out_r, err_r, limits["output_bytes"], stdin_w, data)
        event = child.pump(child.started + limits["timeout"])
        outcome = child.finish()
        report(("case", dict(outcome, status=exit_verdict(event, outcome["exit_code"]))))
    report(("done", {}))


def probe(header: dict) -> None:
    """Facts about the jail, for `sandbox.isolation_report()`."""
    facts = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "undumpable": os.stat("/proc/self/status").st_uid != os.getuid(),
    }
    with open("/proc/net/dev") as file:
        facts["interfaces"] = sorted(line.split(":")[0].strip() for line in file.readlines()[2:])
    facts["visible"] = [path for path in header["hidden"] if os.path.exists(path)]
    facts["writable"] = []
    for path in header["read_only"]:
        try:
            os.close(os.open(os.path.join(path, ".sandbox-probe"), os.O_WRONLY | os.O_CREAT, 0o600))
            facts["writable"].append(path)
        except OSError:
            pass
    report(("done", facts))


def main() -> None:
    os.dup2(1, REPORT_FD)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    uid = int(sys.argv[1])
    if uid >= 0:
        drop_privileges(uid)
    else:
        make_undumpable()
    header = read_frame(0)
    {"program": judge_program, "assert": judge_assertions, "probe": probe}[header["mode"]](header)
    os._exit(0)  # everything is reported; skip the interpreter's shutdown
