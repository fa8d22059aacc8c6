"""The judge's handle on the program's process: its pipes served while the judge waits, its exit, its verdict."""

import os
import select
import time

from .program import MEMORY_EXIT_CODE

SIGKILL, SIGXCPU = 9, 24  # Linux numbers; importing `signal` costs ~2 ms (enum)


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
