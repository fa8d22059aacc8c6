"""What a run is asked to do (limits, tests) and what it reports (Result). Plain dataclasses that also travel
as JSON through the HTTP service."""

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

STATUSES = ("ok", "failed", "timeout", "memory", "output_limit", "error")


@dataclass(frozen=True)
class Limits:
    """Bounds on one run. For IOTests each case is one run of the program and gets the whole `timeout`."""

    timeout: float = 10.0  # wall-clock seconds (CPU seconds are capped at the same figure, rounded up)
    memory_mb: int = 512  # address space of each of the program's processes
    # Processes and threads the program may have at once. Memory is capped per process, so a run can use up
    # to memory_mb * processes in all: keep the product within what the machine can spare.
    processes: int = 8
    output_bytes: int = 1 << 20  # stdout + stderr; past it the run is killed with status "output_limit"
    file_size_mb: int = 16  # largest file it may write
    disk_mb: int = 64  # size of each writable directory (/work, /tmp), in memory, gone after the run
    open_files: int = 64

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            kinds = int if item.type is int else int | float
            if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
                raise ValueError(f"Limits.{item.name} must be a positive {item.type.__name__}, got {value!r}")

    def replace(self, **overrides: float) -> "Limits":
        """A copy with some limits changed; an unknown name is a TypeError that names it."""
        names = {item.name for item in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown limit(s) {unknown}; known limits are {sorted(names)}")
        return dataclasses.replace(self, **overrides)


@dataclass(frozen=True)
class Result:
    """What happened. `passed`/`total` count tests (0/0 for a run without tests); `stdout` is capped at
    Limits.output_bytes and `stderr` keeps its last 8 KiB; `message` says why the verdict is what it is."""

    status: str  # one of STATUSES
    exit_code: int | None  # negative: killed by that signal; None: the program never ran
    stdout: str
    stderr: str
    duration: float  # seconds, wall clock, from launching the sandbox to its last process gone
    passed: int = 0
    total: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        return cls(**data)


@dataclass(frozen=True)
class AssertTests:
    """HumanEval/MBPP-style tests: Python source run against the program's functions.

    Each top-level statement of `code` that contains an `assert` (outside a def/class) is one test; with
    `entry_point`, `check(<entry_point>)` is one more test (the HumanEval convention). Other statements
    (imports, helper defs, `def check`) are set-up. Tests run in a separate process from the program and see
    its functions as remote calls that carry only plain data (numbers, strings, bytes, containers of these),
    so values returned by the program must be plain data too.
    """

    code: str
    entry_point: str | None = None
    statements: tuple[tuple[bool, object], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.code, str):
            raise TypeError(f"AssertTests.code must be a str, got {type(self.code).__name__}")
        try:
            tree = ast.parse(self.code, "<tests>")
        except SyntaxError as exc:
            raise ValueError(f"AssertTests.code does not parse: line {exc.lineno}: {exc.msg}") from None
        statements = []
        for node in tree.body:
            is_test = not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and any(
                isinstance(inner, ast.Assert) for inner in ast.walk(node)
            )
            module = ast.Module(body=[node], type_ignores=[])
            statements.append((is_test, compile(module, "<tests>", "exec")))
        if self.entry_point is not None:
            if not self.entry_point.isidentifier():
                raise ValueError(f"AssertTests.entry_point must be a Python name, got {self.entry_point!r}")
            if not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body):
                raise ValueError(
                    "AssertTests.entry_point is set but the test code defines no `check` function"
                )
            statements.append((True, compile(f"check({self.entry_point})", "<tests>", "exec")))
        if not any(is_test for is_test, _ in statements):
            raise ValueError(
                "AssertTests.code has no top-level assert and no entry_point: there is nothing to test"
            )
        object.__setattr__(self, "statements", tuple(statements))

    @property
    def total(self) -> int:
        return sum(is_test for is_test, _ in self.statements)

    def to_dict(self) -> dict:
        return {"kind": "assert", "code": self.code, "entry_point": self.entry_point}


@dataclass(frozen=True)
class IOTests:
    """Competitive-programming tests: each case is (stdin, expected stdout) for one run of the program.
    `compare="tokens"` matches whitespace-separated tokens; `"exact"` needs identical text."""

    cases: tuple[tuple[str, str], ...]
    compare: Literal["exact", "tokens"] = "tokens"

    def __post_init__(self) -> None:
        cases = tuple(tuple(case) for case in self.cases)
        for index, case in enumerate(cases):
            if len(case) != 2 or not all(isinstance(text, str) for text in case):
                raise ValueError(f"IOTests.cases[{index}] must be a (stdin, expected_stdout) pair of str")
        if not cases:
            raise ValueError("IOTests.cases is empty: there is nothing to test")
        if self.compare not in ("exact", "tokens"):
            raise ValueError(f"IOTests.compare must be 'exact' or 'tokens', got {self.compare!r}")
        object.__setattr__(self, "cases", cases)

    @property
    def total(self) -> int:
        return len(self.cases)

    def matches(self, actual: str, expected: str) -> bool:
        return actual == expected if self.compare == "exact" else actual.split() == expected.split()

    def to_dict(self) -> dict:
        return {"kind": "io", "cases": [list(case) for case in self.cases], "compare": self.compare}


TestSpec = AssertTests | IOTests


def tests_from_dict(data: dict) -> TestSpec:
    """Inverse of `to_dict` of either test style (the HTTP service's wire format)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "assert":
        return AssertTests(data["code"], data.get("entry_point"))
    if kind == "io":
        return IOTests(data["cases"], data.get("compare", "tokens"))
    raise ValueError(f"tests.kind must be 'assert' or 'io', got {kind!r}")
