"""Loading rows from local files (JSONL, Parquet, saved `datasets` dirs) or the hub, and validating them.

Every problem is reported with the file, where the row is and the field, e.g.
`data/train.jsonl: line 17: field messages[2].content: expected a string, got int`: the 1-based line of a JSON
Lines file, as editors count (blank lines hold no row), or the 0-based `row index N` of other sources.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from typing import Any, Literal

import datasets
import numpy as np

from posttrain.errors import UserError

ROLES = ("system", "user", "assistant")


class DataError(UserError, ValueError):
    """Data that cannot be used; the message names the file, the row's line and the field."""


def row_where(source: str, index: int) -> str:
    """Where row `index` (0-based, as `datasets` numbers them) of `source` is: "line N" in a JSON Lines file,
    else "row index N"."""
    lines = _row_lines(source, os.stat(source).st_mtime_ns) if os.path.isfile(source) else None
    return f"line {lines[index]}" if lines is not None and index < len(lines) else f"row index {index}"


@functools.lru_cache(maxsize=8)
def _row_lines(path: str, modified_ns: int) -> np.ndarray | None:
    """The 1-based line of each row of a JSON Lines file (`modified_ns` renews the cache when the file
    changes); None for other files, a JSON array included."""
    if not path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return None
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as handle:
        if handle.read(4096).lstrip().startswith("["):
            return None
        handle.seek(0)
        return np.asarray([number for number, line in enumerate(handle, 1) if line.strip()], dtype=np.int64)


def load_rows(source: str, cache_dir: str | None = None) -> datasets.Dataset:
    """Load one data source as a `datasets.Dataset`.

    `source` is a `.jsonl`/`.json` or `.parquet` file, a directory written by `Dataset.save_to_disk`
    (a `DatasetDict` contributes its `train` split), or `hub:NAME[:SPLIT]` when the machine has network.
    """
    if source.startswith("hub:"):
        name, _, split = source[4:].partition(":")
        return datasets.load_dataset(name, split=split or "train", cache_dir=cache_dir)
    if os.path.isdir(source):
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"DatasetDict has no 'train' split (splits: {list(loaded)})", file=source)
            loaded = loaded["train"]
        return loaded
    if not os.path.isfile(source):
        raise DataError("no such file or directory", file=source)
    kind = _file_kind(source)
    try:
        rows = datasets.load_dataset(kind, data_files=source, split="train", cache_dir=cache_dir)
    except Exception as exc:  # Arrow's own errors name neither row nor field: find them ourselves.
        if kind == "json":
            locate_jsonl_problem(source)
        first_line = str(exc).strip().splitlines()[:1]
        raise DataError(f"could not be read as {kind}: {' '.join(first_line)}", file=source) from exc
    if kind == "json" and _has_mixed_types(rows.features):
        # `datasets` stores a field whose type varies between rows as JSON and decodes it back, which turns
        # the string "4" into the integer 4: refuse such a file and name the row that differs.
        locate_jsonl_problem(source)
        raise DataError(f"fields change type between rows ({rows.features})", file=source)
    return rows


def _has_mixed_types(features: datasets.Features) -> bool:
    from datasets.features.features import _visit

    found: list[bool] = []
    _visit(features, lambda feature: found.append(isinstance(feature, datasets.Json)) or feature)
    return any(found)


def _file_kind(path: str) -> Literal["json", "parquet"]:
    if path.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    if path.endswith(".parquet"):
        return "parquet"
    raise DataError(
        "unsupported file type (use .jsonl, .json, .parquet or a `datasets` directory)", file=path
    )


def locate_jsonl_problem(path: str) -> None:
    """Raise a DataError naming the first line that is not a JSON object or whose field types differ from
    the first row's (the usual reasons Arrow refuses a JSONL file)."""
    first_types: dict[str, type] = {}
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON: {exc.msg}", file=path, where=where) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", file=path, where=where)
            for field, value in row.items():
                if value is None:
                    continue
                expected = first_types.setdefault(field, type(value))
                if not isinstance(value, expected):
                    raise DataError(
                        f"expected {expected.__name__} (as in earlier rows), got {type(value).__name__}",
                        file=path,
                        where=where,
                        field=field,
                    )
                if field in ("messages",) and isinstance(value, list):
                    problem = validate_messages(value, field)
                    if problem:
                        raise DataError(problem, file=path, where=where)


def detect_format(
    source: str, columns: list[str], messages_field: str, prompt_field: str, completion_field: str
) -> str:
    if messages_field in columns:
        return "messages"
    if prompt_field in columns and completion_field in columns:
        return "prompt_completion"
    raise DataError(
        f"rows have neither a `{messages_field}` column nor `{prompt_field}`+`{completion_field}` "
        f"(columns: {columns}); set data.messages_field / data.prompt_field / data.completion_field",
        file=source,
    )


def validate_messages(messages: Any, field: str = "messages", need_assistant: bool = True) -> str | None:
    """Return a description of the first problem in a conversation, or None when it is usable."""
    if not isinstance(messages, list) or not messages:
        return f"field {field}: expected a non-empty list of messages"
    has_assistant = False
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            return f"field {where}: expected an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"field {where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"field {where}.content: expected a string, got {type(content).__name__}"
        if role == "assistant":
            has_assistant = True
            if not content.strip():
                return f"field {where}.content: empty assistant turn"
    if need_assistant and not has_assistant:
        return f"field {field}: no assistant turn to train on"
    return None


def row_to_messages(
    row: dict[str, Any],
    fmt: str,
    messages_field: str,
    prompt_field: str,
    completion_field: str,
    system_prompt: str | None,
) -> tuple[list[dict[str, str]] | None, str | None]:
    """Normalise a row to a conversation; returns (messages, None) or (None, problem)."""
    if fmt == "messages":
        messages = row.get(messages_field)
        problem = validate_messages(messages, messages_field)
        if problem:
            return None, problem
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        prompt, completion = row.get(prompt_field), row.get(completion_field)
        if isinstance(prompt, list):
            problem = validate_messages(prompt, prompt_field, need_assistant=False)
            if problem:
                return None, problem
            prompt_messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        elif isinstance(prompt, str) and prompt.strip():
            prompt_messages = [{"role": "user", "content": prompt}]
        else:
            return None, f"field {prompt_field}: expected a non-empty string or a list of messages"
        if not isinstance(completion, str) or not completion.strip():
            return None, f"field {completion_field}: expected a non-empty string"
        messages = [*prompt_messages, {"role": "assistant", "content": completion}]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, None
