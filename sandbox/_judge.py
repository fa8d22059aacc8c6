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
"""

# Every millisecond of start-up is paid per run: the judge avoids modules with costly imports (selectors,
# signal, threading, traceback pull in collections, enum, functools, re).
import atexit
import builtins
import marshal
import os
import resource
import select
import sys
import time
import types

SIGKILL, SIGXCPU = 9, 24  # Linux numbers; importing `signal` costs ~2 ms (enum)
# A program that dies of MemoryError exits with this code, so the verdict can say "memory" (faking it only
# turns a run into a failure, so it needs no protection).
MEMORY_EXIT_CODE = 86
# The judge's own process counts against the uid's process limit too.
JUDGE_TASKS = 1
MAX_REPLY_BYTES = 64 << 20
EXIT_GRACE = 0.5  # seconds an assert-test program gets to exit after the last test
# The parent's stdout pipe is moved here at start-up, so that whatever the tests print cannot garble reports.
REPORT_FD = 3
PLAIN_TYPES = frozenset({int, float, complex, str, bytes, bool, type(None)})
CONTAINER_TYPES = frozenset({tuple, list, set, frozenset})


def encode_frame(obj: object) -> bytes:
    data = marshal.dumps(obj)
    return len(data).to_bytes(4, "little") + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_bytes: int = MAX_REPLY_BYTES) -> object:
    """The next frame's object, or None at end of stream. Raises ValueError on an oversized frame."""
    head = read_exact(fd, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "little")
    if size > max_bytes:
        raise ValueError(f"frame of {size} bytes is over the {max_bytes}-byte limit")
    data = read_exact(fd, size)
    return None if data is None else marshal.loads(data)


def report(obj: object) -> None:
    write_all(REPORT_FD, encode_frame(obj))


def check_plain(value: object) -> object:
    """`value` itself if it is made only of plain data, else TypeError (code objects and the like)."""
    kind = type(value)
    if kind in PLAIN_TYPES:
        return value
    if kind in CONTAINER_TYPES:
        for item in value:
            check_plain(item)
        return value
    if kind is dict:
        for key, item in value.items():
            check_plain(key)
            check_plain(item)
        return value
    raise TypeError(f"the program sent a {kind.__name__}, which is not plain data")


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


def close_fds_except(keep: tuple[int, ...]) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def apply_limits(limits: dict) -> None:
    cpu = int(limits["timeout"]) + 1
    mib = 1 << 20
    for which, value in (
        (resource.RLIMIT_AS, limits["memory_mb"] * mib),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_NPROC, limits["processes"] + JUDGE_TASKS + 1),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mib),
        (resource.RLIMIT_NOFILE, limits["open_files"]),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))


def spawn(limits: dict, stdin_fd: int, keep: tuple[int, ...] = ()) -> tuple[int, int, int]:
    """Fork the program's process: its own process group, fresh stdio pipes, only `keep` fds, rlimits.
    Returns (pid, stdout read end, stderr read end) in the judge and (0, -1, -1) in the child."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(out_w)
        os.close(err_w)
        return pid, out_r, err_r
    try:
        os.setpgid(0, 0)
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        close_fds_except(keep)
        apply_limits(limits)
    except BaseException:
        os._exit(127)
    return 0, -1, -1


def load_program(source: str, workdir: str) -> types.ModuleType:
    """Run the program as `__main__` of a fresh module, from solution.py in its working directory."""
    path = os.path.join(workdir, "solution.py")
    with open(path, "w", encoding="utf-8") as file:
        file.write(source)
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [path]
    sys.path[0] = workdir
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def print_program_error(exc: BaseException) -> None:
    try:
        import traceback  # only on this error path, in the program's process

        # Skip the judge's own frame so the traceback starts in the program.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
    except BaseException:  # no memory or no free fd left to import traceback: say at least what it was
        try:
            line = f"{type(exc).__name__}: {exc}\n"
        except BaseException:
            line = type(exc).__name__ + "\n"
        os.write(2, line.encode(errors="replace"))


def finish(code: int) -> None:
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(code)


def run_as_main(source: str, workdir: str) -> None:
    """Child side of a plain or stdin/stdout run: behave like `python solution.py`."""
    code = 0
    try:
        load_program(source, workdir)
    except SystemExit as exc:
        code = exit_status(exc.code)
    except MemoryError as exc:
        code = MEMORY_EXIT_CODE
        print_program_error(exc)
    except BaseException as exc:
        print_program_error(exc)
        code = 1
    finish(code)


def describe_exports(module: types.ModuleType) -> list:
    """The program's top-level names as the tests will see them: functions become remote calls, plain values
    are copied, modules are re-imported on the judge's side."""
    exports = []
    for name, value in list(vars(module).items()):
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            exports.append(("module", name, value.__name__))
        elif callable(value):
            exports.append(("call", name, None))
        else:
            try:
                marshal.dumps(value)
            except ValueError:
                continue
            exports.append(("value", name, value))
    return exports


def serve_calls(source: str, workdir: str, requests: int, replies: int) -> None:
    """Child side of an assert-test run: load the program, then answer calls with plain data until EOF."""
    try:
        module = load_program(source, workdir)
    except SystemExit as exc:
        finish(exit_status(exc.code))
    except MemoryError as exc:
        print_program_error(exc)
        finish(MEMORY_EXIT_CODE)
    except BaseException as exc:
        print_program_error(exc)
        finish(1)
    write_all(replies, encode_frame(("ready", describe_exports(module))))
    while (request := read_frame(requests)) is not None:
        name, args, kwargs = request
        try:
            value = vars(module)[name](*args, **kwargs)
            try:
                reply = marshal.dumps(("ok", value))
            except ValueError:
                reply = marshal.dumps(
                    ("raise", "TypeError", f"{name}() returned {type(value).__name__}, not plain data")
                )
        except BaseException as exc:
            try:
                message = str(exc)[:2000]
            except BaseException:
                message = "<unprintable>"
            reply = marshal.dumps(("raise", type(exc).__name__, message))
        sys.stdout.flush()
        write_all(replies, len(reply).to_bytes(4, "little") + reply)
    finish(0)


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Child:
    """The program's process as the judge sees it: feeds its stdin, collects its stdout and stderr (capped),
    notices its exit, and kills its whole process group when done with it. Single-threaded: `pump` serves
    the pipes while the judge waits for something."""

    def __init__(
        self, pid: int, out_r: int, err_r: int, cap: int, stdin_w: int = -1, data: bytes = b""
    ) -> None:
        self.pid, self.out_r, self.err_r, self.cap = pid, out_r, err_r, cap
        self.started = time.monotonic()
        self.pidfd = os.pidfd_open(pid)
        self.outputs = {out_r: bytearray(), err_r: bytearray()}
        self.open_outputs = {out_r, err_r}
        self.poller = select.poll()
        for fd in (out_r, err_r, self.pidfd):
            self.poller.register(fd, select.POLLIN)
        self.stdin_w, self.pending = stdin_w, memoryview(data)
        if stdin_w >= 0 and data:
            os.set_blocking(stdin_w, False)
            self.poller.register(stdin_w, select.POLLOUT)
        elif stdin_w >= 0:
            self.close_stdin()
        self.exited = False
        self.output_exceeded = False

    def close_stdin(self) -> None:
        os.close(self.stdin_w)
        self.stdin_w = -1

    def feed(self) -> None:
        try:
            self.pending = self.pending[os.write(self.stdin_w, self.pending[: 1 << 16]) :]
        except BrokenPipeError:
            self.pending = self.pending[:0]
        if not self.pending:
            self.poller.unregister(self.stdin_w)
            self.close_stdin()

    def collect(self, fd: int, wait: bool = True) -> None:
        """Read what `fd` has; without `wait`, everything buffered (writers may still be alive)."""
        if fd not in self.open_outputs:
            return
        os.set_blocking(fd, wait)
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.poller.unregister(fd)
                self.open_outputs.discard(fd)
                return
            self.outputs[fd] += chunk
            if wait or self.output_size() > self.cap:
                return

    def output_size(self) -> int:
        return len(self.outputs[self.out_r]) + len(self.outputs[self.err_r])

    def pump(self, until: float, wait_fd: int = -1) -> str:
        """Serve the child's pipes until `wait_fd` is readable ("ready"), the child exits ("exited"), its
        output passes the cap ("output_limit") or the clock passes `until` ("deadline")."""
        if wait_fd >= 0:
            self.poller.register(wait_fd, select.POLLIN)
        try:
            while not self.exited:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return "deadline"
                ready = False
                for fd, _ in self.poller.poll(remaining * 1000):
                    if fd == wait_fd:
                        ready = True
                    elif fd == self.pidfd:
                        self.exited = True
                    elif fd == self.stdin_w:
                        self.feed()
                    elif fd in self.outputs:
                        self.collect(fd)
                if self.exited:
                    for fd in self.outputs:
                        self.collect(fd, wait=False)
                if self.output_size() > self.cap:
                    self.output_exceeded = True
                    return "output_limit"
                if ready:
                    return "ready"
            return "exited"
        finally:
            if wait_fd >= 0:
                self.poller.unregister(wait_fd)

    def finish(self) -> dict:
        """Kill what is left of the child's process group, reap it, and describe the run."""
        kill_group(self.pid)
        exit_code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        for fd in (*self.outputs, self.pidfd):
            os.close(fd)
        if self.stdin_w >= 0:
            self.close_stdin()
        return {
            "exit_code": exit_code,
            "stdout": bytes(self.outputs[self.out_r][: self.cap]),
            "stderr": bytes(self.outputs[self.err_r][-8192:]),
        }


def exit_verdict(event: str, exit_code: int) -> str:
    if event == "deadline" or exit_code == -SIGXCPU:
        return "timeout"
    if event == "output_limit":
        return "output_limit"
    if exit_code == MEMORY_EXIT_CODE:
        return "memory"
    return "ok" if exit_code == 0 else "error"


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


class ProgramGone(BaseException):
    """The program's process is no longer answering (exited, killed, or out of time): stop testing."""


class Channel:
    """The judge's end of the call channel to the program's process."""

    def __init__(self, child: Child, requests: int, replies: int, deadline: float) -> None:
        self.child, self.requests, self.replies, self.deadline = child, requests, replies, deadline
        self.gone = ""  # why the program stopped answering: "deadline", "exited", "output_limit", "bad reply"
        self.memory_error = False

    def receive(self) -> object:
        if self.gone:
            raise ProgramGone(f"the program is gone ({self.gone})")
        event = self.child.pump(self.deadline, self.replies)
        message = None
        if event == "ready":
            try:
                message = read_frame(self.replies)
            except Exception as exc:
                event = f"bad reply: {exc}"
        if message is None:
            self.gone = "exited" if event == "ready" else event
            raise ProgramGone(f"the program is gone ({self.gone})")
        return message

    def call(self, name: str, args: tuple, kwargs: dict) -> object:
        if self.gone:
            raise ProgramGone(f"the program is gone ({self.gone})")
        try:
            request = encode_frame((name, args, kwargs))
        except ValueError:
            raise TypeError(f"arguments to {name}() must be plain data to reach the program") from None
        try:
            write_all(self.requests, request)
        except BrokenPipeError:
            self.gone = "exited"
            raise ProgramGone("the program is gone (exited)") from None
        reply = self.receive()
        if type(reply) is not tuple or not reply or reply[0] not in ("ok", "raise"):
            raise TypeError("malformed reply from the program")
        if reply[0] == "ok" and len(reply) == 2:
            return check_plain(reply[1])
        _, type_name, message = reply
        if type_name == "MemoryError":
            self.memory_error = True
        exc_type = getattr(builtins, str(type_name), None)
        if isinstance(exc_type, type) and issubclass(exc_type, Exception):
            raise exc_type(str(message))
        raise RuntimeError(f"{type_name}: {message}")


class RemoteFunction:
    """Stands in for one of the program's functions inside the tests; every call crosses to its process."""

    def __init__(self, channel: Channel, name: str) -> None:
        self.channel, self.__name__ = channel, name

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.channel.call(self.__name__, args, kwargs)

    def __repr__(self) -> str:
        return f"<program function {self.__name__}>"


def test_namespace(channel: Channel, exports: object, entry_point: str | None) -> dict:
    """The globals the tests run with. The program's names never shadow builtins: a program defining its own
    `abs` or `isinstance` must not change what the tests compute."""
    namespace = {"__name__": "__tests__", "__builtins__": builtins}
    for kind, name, value in exports if type(exports) is list else ():
        if type(name) is not str or (hasattr(builtins, name) and name != entry_point):
            continue
        if kind == "call":
            namespace[name] = RemoteFunction(channel, name)
        elif kind == "value":
            try:
                namespace[name] = check_plain(value)
            except (TypeError, RecursionError):
                pass
        elif kind == "module" and value in sys.stdlib_module_names:
            __import__(value)
            namespace[name] = sys.modules[value]
    return namespace


def judge_assertions(header: dict) -> None:
    """Load the program in a child, then run each test statement here, calling into the child."""
    limits = header["limits"]
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    devnull = os.open(os.devnull, os.O_RDONLY)
    pid, out_r, err_r = spawn(limits, devnull, keep=(request_r, reply_w))
    if pid == 0:
        serve_calls(header["source"], header["workdir"], request_r, reply_w)
    for fd in (request_r, reply_w, devnull):
        os.close(fd)
    child = Child(pid, out_r, err_r, limits["output_bytes"])
    deadline = child.started + limits["timeout"]
    statements = read_frame(0)  # read only now: the child was forked without the tests in its memory
    channel = Channel(child, request_w, reply_r, deadline)
    passed, message, loaded = [], "", False
    try:
        ready = channel.receive()
        loaded = type(ready) is tuple and len(ready) == 2 and ready[0] == "ready"
        namespace = test_namespace(channel, ready[1] if loaded else [], header["entry_point"])
        for is_test, code in statements:
            try:
                exec(code, namespace)
            except ProgramGone:
                raise
            except BaseException as exc:
                if not is_test:
                    message = f"test setup failed: {type(exc).__name__}: {exc}"
                    break
                message = message or f"test {len(passed)} failed: {type(exc).__name__}: {exc}"
                passed.append(False)
            else:
                if not is_test:
                    continue
                passed.append(True)
            report(("test", len(passed) - 1, passed[-1]))
    except ProgramGone as exc:
        message = message or str(exc)
    # Let the program exit on its own (EOF on its requests) so its exit code means something; then kill.
    os.close(request_w)
    child.pump(min(deadline, time.monotonic() + EXIT_GRACE))
    outcome = child.finish()
    if channel.gone == "deadline":
        status = "timeout"
    elif child.output_exceeded:
        status = "output_limit"
    elif channel.memory_error or outcome["exit_code"] == MEMORY_EXIT_CODE:
        status = "memory"
    elif not loaded:
        status = exit_verdict("exited", outcome["exit_code"])
        status = "failed" if status == "ok" else status
        message = "the program exited before its definitions were loaded"
    elif channel.gone or len(passed) < header["total"] or not all(passed):
        status = "failed"
    else:
        status = "ok"
    report(("done", dict(outcome, status=status, message=message)))


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
