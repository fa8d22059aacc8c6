"""The attack corpus: programs that try to break, read, reach or fool the sandbox. For each, the verdict, the
parent (this process) alive, no marker files and no process left (the `no_leftovers` fixture)."""

import os
import shutil
import socket
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

import sandbox
from sandbox._judge.frames import encode_frame

pytestmark = pytest.mark.usefixtures("no_leftovers")

ADD_TESTS = sandbox.AssertTests("assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(10, 5) == 15\n")
WRONG_ADD = "def add(a, b):\n    return a - b\n"


def attack(code: str, **kwargs) -> sandbox.Result:
    return sandbox.run(textwrap.dedent(code), **kwargs)


@pytest.fixture
def host_dir():
    """A world-writable host directory (outside /tmp, which the jail replaces with its own): any file
    appearing in it came from a sandbox that reached the host."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="sandbox-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_infinite_loop_times_out():
    result = attack("while True:\n    pass\n", timeout=1)
    assert result.status == "timeout"
    assert result.exit_code is not None and result.exit_code < 0
    assert result.duration < 4


def test_fork_bomb_is_contained_and_other_runs_still_work():
    bomb = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    with sandbox.Pool(2) as pool:
        bombing = pool.submit(textwrap.dedent(bomb), timeout=2)
        time.sleep(0.3)
        bystander = pool.run("import os\nprint(os.fork() > 0 or 0)\n", timeout=5)
        result = bombing.result()
    assert result.status in ("timeout", "error")
    assert bystander.status == "ok", bystander  # its own uid: the bomb does not eat its process budget


def test_memory_bombs_are_stopped():
    assert attack("x = bytearray(10**10)\n").status == "memory"
    result = attack("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n", memory_mb=128)
    assert result.status == "memory"
    assert "MemoryError" in result.stderr
    in_a_call = sandbox.run(
        "chunks = []\ndef add(a, b):\n    while True:\n        chunks.append(bytearray(1 << 20))\n",
        tests=ADD_TESTS,
        memory_mb=128,
    )
    assert in_a_call.status == "memory" and in_a_call.passed == 0


def test_output_flood_is_cut():
    result = attack("while True:\n    print('x' * 1000)\n", output_bytes=100_000)
    assert result.status == "output_limit"
    assert 0 < len(result.stdout) <= 100_000


def test_disk_fill_hits_the_limits():
    one_file = attack(
        "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))\n", file_size_mb=8
    )
    assert one_file.status == "error"
    many_files = attack(
        """
        import os
        written = 0
        try:
            for i in range(10_000):
                with open(f'f{i}', 'wb') as f:
                    f.write(b'x' * (1 << 20))
                written += 1
        finally:
            print(written)
        """,
        disk_mb=16,
    )
    assert many_files.status == "error" and "No space left" in many_files.stderr
    assert int(many_files.stdout) <= 16


def test_cannot_write_outside_its_directories(host_dir):
    result = attack(
        f"""
        import os
        for path in ['/usr/x', '/etc/x', '/x', '/root/x', '/proc/x', '/dev/x', '/sandbox/x', {str(host_dir)!r} + '/marker']:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, 'w') as f:
                    f.write('escaped')
                print('WROTE', path)
            except OSError:
                pass
        open('/work/fine', 'w').write('ok')
        open('/tmp/fine', 'w').write('ok')
        print('done')
        """
    )
    assert result.status == "ok", result
    assert result.stdout.strip() == "done"
    assert list(host_dir.iterdir()) == []


def test_cannot_read_host_secrets(monkeypatch):
    secret = "posttrain-fake-secret-4f1c"
    monkeypatch.setenv("SANDBOX_TEST_SECRET", secret)
    result = attack(
        """
        import glob, os
        print(dict(os.environ))
        for path in ['/etc/shadow', '/etc/passwd', *glob.glob('/proc/*/environ'), '/proc/1/root/etc/shadow']:
            try:
                print(path, open(path, 'rb').read()[:200])
            except OSError as e:
                print(path, 'denied', e.errno)
        """
    )
    assert result.status == "ok", result
    assert secret not in result.stdout and "root:" not in result.stdout
    assert "SANDBOX_TEST_SECRET" not in result.stdout


def test_no_network_egress_to_a_loopback_listener():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted, finished = [], threading.Event()

    def accept() -> None:
        while not finished.is_set():
            try:
                accepted.append(listener.accept())
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    result = attack(
        f"""
        import socket
        for host in ['127.0.0.1', 'localhost', '::1']:
            try:
                socket.create_connection((host, {port}), timeout=1).sendall(b'escaped')
                print('CONNECTED', host)
            except OSError:
                pass
        print('done')
        """
    )
    finished.set()
    thread.join()
    listener.close()
    assert result.stdout.strip() == "done", result
    assert accepted == []


def test_cannot_kill_the_parent():
    me = os.getpid()
    result = attack(
        f"""
        import os, signal
        for pid in ({me}, {os.getppid()}, os.getppid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.kill(-1, signal.SIGKILL)
        """,
        tests=None,
    )
    assert result.status in ("error", "failed")
    # The same attack from inside an assert-test run kills the judge: no verdict, so no pass.
    tested = attack(
        "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n", tests=ADD_TESTS
    )
    assert tested.status != "ok" and tested.passed == 0
    assert os.getpid() == me  # still here


def test_double_forked_child_does_not_outlive_the_run(host_dir, leftovers):
    marker = host_dir / "marker"
    result = attack(
        f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(2)
                for path in ['/work/marker', {str(marker)!r}]:
                    try:
                        open(path, 'w').write('alive')
                    except OSError:
                        pass
                os._exit(0)
            os._exit(0)
        time.sleep(10)
        """,
        timeout=1,
    )
    assert result.status == "timeout"
    assert leftovers() == []  # gone right away, not only once it would have finished
    time.sleep(2.5)
    assert not marker.exists()


def test_deep_recursion_crash_is_contained():
    # Recursing through a C function (map) overflows the C stack: the interpreter dies of SIGSEGV.
    result = attack(
        "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return list(map(f, [n + 1]))\nf(0)\n"
    )
    assert result.status == "error" and result.exit_code == -11, result
    assert sandbox.run("print(1)").stdout == "1\n"


def test_fd_exhaustion_is_contained():
    result = attack("files = []\nwhile True:\n    files.append(open('/dev/null'))\n", open_files=32)
    assert result.status == "error" and "Too many open files" in result.stderr
    assert sandbox.run("print(1)").stdout == "1\n"


@pytest.mark.parametrize(
    "cheat",
    [
        "import sys\nsys.exit(0)\n" + WRONG_ADD,
        "import os\nos._exit(0)\n",
        WRONG_ADD + "import sys\nsys.exit(0)\n",
        "import sys\ndef add(a, b):\n    sys.exit(0)\n",
        "import os\ndef add(a, b):\n    os._exit(0)\n",
    ],
    ids=["exit-before-defs", "os-exit", "exit-after-defs", "exit-in-call", "os-exit-in-call"],
)
def test_early_exit_does_not_pass(cheat):
    result = sandbox.run(cheat, tests=ADD_TESTS)
    assert result.status in ("failed", "error") and result.passed == 0 and result.total == 3


def test_patched_builtins_do_not_pass():
    cheat = """
        import builtins
        class Never(Exception):
            pass
        builtins.AssertionError = Never
        builtins.isinstance = lambda *a: True
        builtins.abs = lambda x: 0
        builtins.__import__ = None
        def abs(x):
            return 0
        def add(a, b):
            return 0
    """
    tests = sandbox.AssertTests("assert abs(add(2, 3) - 5) < 1e-9\nassert isinstance(add(1, 1), str)\n")
    result = sandbox.run(textwrap.dedent(cheat), tests=tests)
    assert result.status == "failed" and result.passed == 0


def test_fake_eq_does_not_pass():
    cheat = """
        class Anything(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        class Whatever:
            def __eq__(self, other):
                return True
        def add(a, b):
            return Anything(0) if a > 0 else Whatever()
    """
    result = sandbox.run(textwrap.dedent(cheat), tests=ADD_TESTS)
    assert result.status == "failed" and result.passed == 0


def test_printing_pass_markers_does_not_pass():
    forged = encode_frame(
        ("done", {"status": "ok", "exit_code": 0, "stdout": b"", "stderr": b"", "message": ""})
    )
    cheat = f"""
        import os, sys
        forged = {forged!r}
        print('PASSED 3/3\\nok')
        for fd in range(1, 64):
            try:
                os.write(fd, forged)
            except OSError:
                pass
    """
    cheat = textwrap.dedent(cheat) + WRONG_ADD
    result = sandbox.run(cheat, tests=ADD_TESTS)
    # The forged frame reached only the program's own pipes.
    assert result.status == "failed" and result.passed == 0
    io_result = sandbox.run(cheat, tests=sandbox.IOTests([("", "42")]))
    assert io_result.status == "failed" and io_result.passed == 0


def test_cannot_read_the_tests():
    secret = 982_451_653
    tests = sandbox.AssertTests(f"assert answer() == {secret}\n")
    cheat = """
        import gc, glob, os, re, sys
        found = set()
        def scan(text):
            found.update(int(n) for n in re.findall(r'\\b(\\d{9})\\b', text))
        for path in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ') + glob.glob('/proc/*/mem'):
            try:
                scan(open(path, 'rb').read(1 << 20).decode('latin-1'))
            except OSError:
                pass
        for fd_path in glob.glob('/proc/*/fd/*'):
            try:
                os.set_blocking(fd := os.open(fd_path, os.O_RDONLY | os.O_NONBLOCK), False)
                scan(os.read(fd, 1 << 20).decode('latin-1'))
            except OSError:
                pass
        for root, dirs, files in os.walk('/'):
            if root.startswith(('/proc', '/sys', '/usr', '/dev', sys.prefix)):
                dirs[:] = []
                continue
            for name in files:
                try:
                    scan(open(os.path.join(root, name), 'rb').read(1 << 20).decode('latin-1'))
                except OSError:
                    pass
        for obj in gc.get_objects():
            if isinstance(obj, (str, bytes)):
                scan(obj if isinstance(obj, str) else obj.decode('latin-1'))
        for module in [m for name, m in sys.modules.items() if name.split('.')[0] == '_judge']:
            for value in vars(module).values():
                scan(repr(value))
        def answer():
            return max(found, default=0)
    """
    result = sandbox.run(textwrap.dedent(cheat), tests=tests)
    assert result.status == "failed" and result.passed == 0, result


def test_a_case_cannot_leave_anything_for_the_next():
    # Case 0 leaves a fork bomb's worth of processes, a daemon and files; case 1 must start clean.
    program = """
        import os, sys, time
        if os.path.exists('/work/flag') or os.path.exists('/tmp/flag'):
            print('dirty')
            sys.exit()
        open('/work/flag', 'w').close()
        open('/tmp/flag', 'w').close()
        children = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
            except OSError:
                break
        print('clean' if children >= 20 else f'starved: {children} children')  # 32 allowed, minus us
    """
    cases = sandbox.IOTests([("", "clean"), ("", "clean")])
    result = sandbox.run(textwrap.dedent(program), tests=cases, processes=32)
    assert (result.status, result.passed) == ("ok", 2), result
