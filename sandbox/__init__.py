"""Run untrusted, model-written programs safely and fast, locally: a jail per run (namespaces, own uid,
rlimits), verdicts computed outside the program, a thread pool and an HTTP service.

    import sandbox
    result = sandbox.run(code, tests=sandbox.AssertTests(test_code, entry_point="add"), timeout=5)
    result.status, result.passed, result.total

Imports nothing of posttrain's; see `isolation` for the layers and `_judge` for why verdicts cannot be forged.
"""

from sandbox.isolation import IsolationError, IsolationReport
from sandbox.launch import isolation_report
from sandbox.pool import Pool
from sandbox.runner import run
from sandbox.server import Client
from sandbox.spec import AssertTests, IOTests, Limits, Result, TestSpec

__all__ = [
    "AssertTests",
    "Client",
    "IOTests",
    "IsolationError",
    "IsolationReport",
    "Limits",
    "Pool",
    "Result",
    "TestSpec",
    "isolation_report",
    "run",
]
