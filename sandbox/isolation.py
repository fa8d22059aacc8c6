"""The jail around each run: the command lines that build it, and the uids runs get (`launch` starts it and
checks, once per process, that every layer works on this machine).

Layers, outermost first:
- bubblewrap (`bwrap`, Debian package `bubblewrap`) gives each run its own PID, network, IPC, UTS and mount
  namespaces: no network but a private loopback; the run's processes cannot see or signal ours, and all of
  them die with the namespace's init, the judge, when the run ends (double-forked daemons included); the
  filesystem is read-only /usr and the Python prefix, a fresh /proc and /dev, and two small private tmpfs
  (/work, the working directory, and /tmp) that vanish with the run; host files (/etc, /root, the
  repository) do not exist; bwrap also sets no_new_privs and mounts everything nosuid.
- a uid of its own per concurrent run (we must be root to switch to it): no capabilities, no access to
  anything owned by root, a process limit that other runs do not share, and a judge the program cannot
  ptrace (see `_judge`).
- rlimits on the program (CPU, address space, processes, file size, open files, no core dumps), its own
  process group, a scrubbed environment, and the parent's wall-clock deadline on the whole sandbox.

If a layer is missing, `run` refuses to execute anything unless the caller opts into weak isolation
(`allow_weak_isolation=True` or SANDBOX_ALLOW_WEAK_ISOLATION=1); a weak run keeps only the last group of layers.
"""

import os
import shutil
import sys
import threading
from dataclasses import dataclass

WEAK_ISOLATION_ENV = "SANDBOX_ALLOW_WEAK_ISOLATION"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
PYTHON = os.path.realpath(sys.executable)
# Runs get uids far above any real account: a block of SLOTS per parent process, so concurrent runs of one
# process never share a uid (sharing would share RLIMIT_NPROC, letting one fork bomb starve the others).
UID_BASE = 200_000_000
SLOTS = 256
JAIL_WORKDIR, JAIL_TMPDIR, JAIL_PACKAGE = "/work", "/tmp", "/sandbox"
# Inside the jail the judge starts from the package directory, mounted read-only (its .pyc is reused).
BOOT = "import sys; sys.path[:0] = [sys.argv.pop(2)]; import _judge; _judge.main()"


class IsolationError(RuntimeError):
    """A required isolation layer is missing on this machine."""


@dataclass(frozen=True)
class IsolationReport:
    """Each layer mapped to None when it works here, else to why it does not."""

    layers: dict[str, str | None]

    @property
    def missing(self) -> list[str]:
        return [name for name, problem in self.layers.items() if problem]

    @property
    def ok(self) -> bool:
        return not self.missing

    def __str__(self) -> str:
        return "\n".join(
            f"{name:18s} {'ok' if not why else 'MISSING: ' + why}" for name, why in self.layers.items()
        )


class UidSlots:
    """Hands each concurrent run of this process its own uid."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free = list(range(SLOTS))
        self._base = UID_BASE + (os.getpid() % 1_000_000) * SLOTS

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError(f"more than {SLOTS} sandbox runs at once in one process")
            return self._base + self._free.pop()

    def release(self, uid: int) -> None:
        with self._lock:
            self._free.append(uid - self._base)


uid_slots = UidSlots()


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def python_prefix() -> str:
    prefix = os.path.realpath(sys.base_prefix)
    if not PYTHON.startswith(prefix + os.sep):
        raise IsolationError(f"the interpreter {PYTHON} is outside its prefix {prefix}; cannot mount it")
    return prefix


def jail_command(disk_mb: int, info_fd: int) -> list[str]:
    """bwrap's argv up to the command it runs. bwrap writes the pid of the jail's init to `info_fd`."""
    mib = str(disk_mb << 20)
    args = [bwrap_path() or "bwrap", "--info-fd", str(info_fd)]
    # The judge is the namespace's init (--as-pid-1): one process less per run, the program cannot signal
    # it, and its exit kills everything left in the namespace.
    args += [
        "--unshare-pid",
        "--as-pid-1",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    args += [
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--cap-add",
        "CAP_SETUID",
        "--cap-add",
        "CAP_SETGID",
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": JAIL_WORKDIR, "TMPDIR": JAIL_TMPDIR, "LANG": "C.UTF-8"}
    for name, value in env.items():
        args += ["--setenv", name, value]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = python_prefix()
    if not prefix.startswith("/usr/"):
        # bwrap would create the prefix's parents with the host's modes (e.g. /root is 0700): make them
        # traversable for the run's uid.
        parents = []
        parent = os.path.dirname(prefix)
        while parent != "/":
            parents.insert(0, parent)
            parent = os.path.dirname(parent)
        for path in parents:
            args += ["--perms", "0755", "--dir", path]
        args += ["--ro-bind", prefix, prefix]
    args += ["--ro-bind", PACKAGE_DIR, JAIL_PACKAGE, "--proc", "/proc", "--dev", "/dev"]
    for path in (JAIL_WORKDIR, JAIL_TMPDIR):
        args += ["--perms", "1777", "--size", mib, "--tmpfs", path]
    args += ["--chdir", JAIL_WORKDIR, "--remount-ro", "/"]
    return args


def judge_command(uid: int, package_dir: str) -> list[str]:
    """The interpreter command that starts the judge (uid -1: do not switch uid)."""
    return [PYTHON, "-I", "-S", "-c", BOOT, str(uid), package_dir]


def weak_isolation_allowed(allow: bool) -> bool:
    return allow or os.environ.get(WEAK_ISOLATION_ENV, "") not in ("", "0")
