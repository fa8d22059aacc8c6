"""The HTTP service (`python -m sandbox serve`) that lets reward workers on other machines share one sandbox
host, and its `Client`.

    POST /run      {"source": ..., "tests": {...} | null, "stdin": ..., "language": ..., "limits": {...}}
                   -> 200 Result as JSON; 400 {"error": ...} for a bad request
    GET  /health   -> 200 {"workers": N, "isolation": {layer: null | why missing}}
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sandbox import isolation, launch
from sandbox.pool import Pool
from sandbox.spec import Limits, Result, TestSpec, tests_from_dict

MAX_REQUEST_BYTES = 64 << 20


def _request_to_kwargs(body: dict) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("source"), str):
        raise ValueError("the request must be a JSON object with a string 'source'")
    unknown = set(body) - {"source", "tests", "stdin", "language", "limits"}
    if unknown:
        raise ValueError(f"unknown request field(s) {sorted(unknown)}")
    kwargs = {
        "source": body["source"],
        "stdin": body.get("stdin"),
        "language": body.get("language", "python"),
    }
    if body.get("tests") is not None:
        kwargs["tests"] = tests_from_dict(body["tests"])
    kwargs["limits"] = Limits().replace(**(body.get("limits") or {}))
    return kwargs


def make_server(host: str, port: int, pool: Pool) -> ThreadingHTTPServer:
    """An HTTP server whose requests run on `pool` (its back-pressure bounds the work in flight)."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != "/health":
                return self._reply(404, {"error": f"no such path {self.path}"})
            report = launch.isolation_report()
            self._reply(200, {"workers": pool.workers, "isolation": report.layers})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/run":
                return self._reply(404, {"error": f"no such path {self.path}"})
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_REQUEST_BYTES:
                return self._reply(413, {"error": f"request over {MAX_REQUEST_BYTES} bytes"})
            try:
                result = pool.run(**_request_to_kwargs(json.loads(self.rfile.read(size))))
            except (ValueError, TypeError, KeyError) as exc:
                return self._reply(400, {"error": f"{type(exc).__name__}: {exc}"})
            except Exception as exc:  # the sandbox host's fault, not the request's: the client may retry
                return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            self._reply(200, result.to_dict())

        def log_message(self, format: str, *args: object) -> None:  # requests are too many to log
            pass

    return ThreadingHTTPServer((host, port), Handler)


class Client:
    """Calls a sandbox service. Runs are pure, so failed requests (connection errors, 5xx, timeouts) are
    retried `retries` times with exponential back-off; a 4xx is the caller's error and raises ValueError.
    `timeout` is per request and must exceed the runs' own time limits."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.2) -> None:
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff

    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    raise ValueError(
                        f"sandbox service rejected the request: {exc.read().decode(errors='replace')}"
                    ) from None
                error: Exception = exc
            except (urllib.error.URLError, OSError) as exc:
                error = exc
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise ConnectionError(
            f"sandbox service at {self.url} failed after {self.retries + 1} attempts: {error}"
        )

    def run(
        self,
        source: str,
        *,
        tests: TestSpec | None = None,
        stdin: str | None = None,
        language: str = "python",
        limits: Limits | None = None,
        **limit_overrides: float,
    ) -> Result:
        """`sandbox.run` on the service."""
        limits = (limits or Limits()).replace(**limit_overrides)
        body = {"source": source, "stdin": stdin, "language": language, "limits": vars(limits)}
        body["tests"] = tests.to_dict() if tests is not None else None
        return Result.from_dict(self._request("/run", body))

    def health(self) -> dict:
        return self._request("/health")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox",
        description="Run untrusted programs in jails: serve runs over HTTP, or check.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve runs over HTTP (POST /run, GET /health)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed at start)")
    serve.add_argument("--workers", type=int, default=2, help="runs at once (about one per core)")
    serve.add_argument(
        "--allow-weak-isolation", action="store_true", help="run even if an isolation layer is missing"
    )
    commands.add_parser("check", help="print which isolation layers work here; exit 1 if any is missing")
    args = parser.parse_args(argv)

    report = launch.isolation_report()
    print(report, file=sys.stderr)
    if args.command == "check":
        return 0 if report.ok else 1
    try:
        pool = Pool(args.workers, allow_weak_isolation=args.allow_weak_isolation)
    except isolation.IsolationError as exc:
        print(exc, file=sys.stderr)
        return 1
    with pool, make_server(args.host, args.port, pool) as server:
        print(
            f"sandbox serving on http://{args.host}:{server.server_address[1]} with {args.workers} workers",
            file=sys.stderr,
            flush=True,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0
