"""Mistakes a person can fix: a recipe, a data file or a command line that cannot run.

Each problem is one line, `FILE: line N: field X: message` (the parts that are known), so an editor or a
terminal can jump to it. The CLI prints every problem of a `UserError` as `error: <problem>` and exits with 2,
without a traceback; any other exception is a bug in posttrain and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError


@dataclass(frozen=True)
class Problem:
    """One thing to fix. `where` locates it inside `file`: "line 4" (1-based, as editors count), "row index 3"
    (files without lines), or "override train.lr" (a value set on the command line)."""

    message: str
    file: str | None = None
    where: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        field = f"field {self.field}" if self.field else None
        return ": ".join(part for part in (self.file, self.where, field, self.message) if part)


class UserError(Exception):
    """One or more problems in what the user gave; `str()` is one line per problem."""

    def __init__(
        self,
        message: str = "",
        *,
        file: str | None = None,
        where: str | None = None,
        field: str | None = None,
        problems: list[Problem] | None = None,
    ) -> None:
        self.problems = problems or [Problem(message, file, where, field)]
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its problems when it crosses a process boundary (`datasets.map` with num_proc > 1).
        return (_rebuild, (type(self), self.problems))


class RecipeError(UserError, ValueError):
    """A recipe that cannot run; each problem names the file, the key's line and the key."""


class RunExistsError(UserError, FileExistsError):
    """An output directory that already holds a run, when neither resuming nor overwriting it was asked."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or package the user named does not exist."""


def _rebuild(cls: type[UserError], problems: list[Problem]) -> UserError:
    return cls(problems=problems)


def yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The 1-based line of every key and list item of a YAML document, by its path: ("train", "lr") -> 12,
    ("rewards", "functions", "0") -> 20. List indices are given as strings, like the other path parts."""
    lines: dict[tuple[str, ...], int] = {}

    def visit(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, str(key.value))] = key.start_mark.line + 1
                visit(value, (*path, str(key.value)))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[(*path, str(index))] = item.start_mark.line + 1
                visit(item, (*path, str(index)))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        visit(root, ())
    return lines


# Where each value of a recipe came from, by key path (list indices as strings): "line N" or "override KEY".
Origins = dict[tuple[str, ...], str]


def recipe_origins(text: str, overrides: list[str]) -> Origins:
    """Each key's line in the YAML `text`; a `dotted.key=value` override replaces everything under its key."""
    origins = {path: f"line {line}" for path, line in yaml_key_lines(text).items()}
    for item in overrides:
        path = tuple(item.partition("=")[0].split("."))
        origins = {p: where for p, where in origins.items() if p[: len(path)] != path}
        origins[path] = f"override {'.'.join(path)}"
    return origins


def locate(file: str, origins: Origins, key: tuple[str, ...], field: str, message: str) -> Problem:
    """A problem at `key`, placed on the override that wrote the key or a value under it (then without the
    file: the value came from the command line), else on the line of the key or of its nearest ancestor."""
    for path, where in origins.items():
        if where.startswith("override") and path[: len(key)] == key:
            return Problem(message, None, where, field)
    for end in range(len(key), 0, -1):
        where = origins.get(key[:end])
        if where is not None:
            return Problem(message, None if where.startswith("override") else file, where, field)
    return Problem(message, file, None, field)


def validation_problems(file: str, error: ValidationError, raw: dict, origins: Origins) -> list[Problem]:
    """One problem per field of a pydantic error, in the order of the lines. Its `loc` holds union member tags
    ("bool", "literal['auto']") between the keys: they are dropped, and the messages of one field's members
    joined."""
    messages: dict[tuple[str, ...], list[str]] = {}
    inputs: dict[tuple[str, ...], str] = {}
    for problem in error.errors():
        key: list[str] = []
        node: Any = raw
        for part in problem["loc"]:
            if isinstance(node, dict):
                key.append(str(part))
                node = node.get(part)
            elif isinstance(node, list | tuple) and isinstance(part, int) and part < len(node):
                key.append(str(part))
                node = node[part]
            elif not isinstance(part, str):  # an index into a value that is not a list
                key.append(str(part))
                node = None
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = (
                "unknown key (check the spelling; see `posttrain <command> --help` for the recipe format)"
            )
        elif problem["type"] != "missing" and isinstance(problem.get("input"), str | int | float | bool):
            inputs[tuple(key)] = f" (got {problem['input']!r})"
        messages.setdefault(tuple(key), []).append(message)
    problems = [
        locate(file, origins, key, ".".join(key) or "<top level>", "; or ".join(texts) + inputs.get(key, ""))
        for key, texts in messages.items()
    ]
    return sorted(problems, key=_line_order)


def _line_order(problem: Problem) -> tuple[int, int]:
    """Lines first, in the file's order; then overrides and problems without a place."""
    where = problem.where or ""
    return (0, int(where.removeprefix("line "))) if where.startswith("line ") else (1, 0)
