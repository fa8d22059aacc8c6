"""Assert tests: the program's definitions load in its own process; each test statement runs in the judge and
calls into that process through a channel that carries plain data only."""

import builtins
import os
import sys
import time

from .child import Child, exit_verdict
from .frames import check_plain, encode_frame, read_frame, report, write_all
from .program import MEMORY_EXIT_CODE, serve_calls, spawn

EXIT_GRACE = 0.5  # seconds an assert-test program gets to exit after the last test


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
