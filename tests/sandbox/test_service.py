"""The pool's back-pressure and the HTTP service with its client, on loopback."""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sandbox
from sandbox.server import make_server

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = sandbox.AssertTests("assert add(1, 2) == 3\nassert add(2, 2) == 4\n")
REPO = Path(__file__).resolve().parents[2]


def test_pool_map_keeps_order_and_bounds_pending_runs():
    with sandbox.Pool(2, max_pending=2, timeout=5) as pool:
        results = pool.map([{"source": f"print({i} * 2)"} for i in range(6)])
        assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(6)]
        slow = [pool.submit("import time\ntime.sleep(0.5)") for _ in range(2)]
        started = time.monotonic()
        pool.submit("pass").result()  # must wait for a slot: both are taken by the sleepers
        assert time.monotonic() - started >= 0.3
        assert all(future.result().ok for future in slow)
    with pytest.raises(ValueError, match="max_pending"):
        sandbox.Pool(4, max_pending=2)


@pytest.fixture
def service():
    with sandbox.Pool(2) as pool, make_server("127.0.0.1", 0, pool) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()
        thread.join()


def test_client_runs_match_local_runs(service):
    client = sandbox.Client(service, timeout=30)
    assert all(problem is None for problem in client.health()["isolation"].values())
    remote = client.run(ADD, tests=ADD_TESTS)
    assert (remote.status, remote.passed, remote.total) == ("ok", 2, 2)
    io = client.run(
        "print(int(input()) + 1)", tests=sandbox.IOTests([("1", "2"), ("5", "7")], compare="exact")
    )
    assert (io.status, io.passed, io.total) == ("failed", 0, 2)  # exact: "2\n" is not "2"
    assert client.run("while True: pass", timeout=1).status == "timeout"
    with pytest.raises(ValueError, match="unknown limit"):
        client._request("/run", {"source": "pass", "limits": {"bogus": 1}})


def test_client_retries_until_the_service_is_up():
    with sandbox.Pool(1) as pool:
        server = make_server("127.0.0.1", 0, pool)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        server.server_close()  # the port is known but nothing listens yet
        late = {}

        def start_late() -> None:
            late["server"] = make_server("127.0.0.1", int(url.rsplit(":", 1)[1]), pool)
            late["server"].serve_forever()

        starter = threading.Timer(0.4, start_late)
        starter.start()
        try:
            result = sandbox.Client(url, timeout=10, retries=5, backoff=0.2).run(ADD, tests=ADD_TESTS)
            assert result.ok
        finally:
            starter.join(0.1)
            while "server" not in late:
                time.sleep(0.05)
            late["server"].shutdown()
            late["server"].server_close()
    with pytest.raises(ConnectionError, match="after 2 attempts"):
        sandbox.Client(url, timeout=1, retries=1, backoff=0.01).run("pass")


def test_python_m_sandbox_serve():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "serve", "--port", "0", "--workers", "1"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = None
        for line in process.stderr:
            if match := re.search(r"serving on http://127.0.0.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the service did not start"
        result = sandbox.Client(f"http://127.0.0.1:{port}", timeout=30).run("print('hi')")
        assert (result.status, result.stdout) == ("ok", "hi\n")
    finally:
        process.terminate()
        process.wait(10)
