"""Loading rows from local files (JSONL, Parquet, saved `datasets` dirs) or the hub, and validating them.

Every problem is reported with the file, the row index and the field, e.g.
`data/train.jsonl: row 17: field messages[2].content: expected a string, got int`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import datasets

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A row that cannot be used; the message names file, row and field."""


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
                raise DataError(f"{source}: DatasetDict has no 'train' split (splits: {list(loaded)})")
            loaded = loaded["train"]
        return loaded
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file or directory")
    kind = _file_kind(source)
    try:
        rows = datasets.load_dataset(kind, data_files=source, split="train", cache_dir=cache_dir)
    except Exception as exc:  # Arrow's own errors name neither row nor field: find them ourselves.
        if kind == "json":
            locate_jsonl_problem(source)
        raise DataError(f"{source}: could not be read as {kind}: {exc}") from exc
    if kind == "json" and _has_mixed_types(rows.features):
        # `datasets` stores a field whose type varies between rows as JSON and decodes it back, which turns
        # the string "4" into the integer 4: refuse such a file and name the row that differs.
        locate_jsonl_problem(source)
        raise DataError(f"{source}: fields change type between rows ({rows.features})")
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
    raise DataError(f"{path}: unsupported file type (use .jsonl, .json, .parquet or a `datasets` directory)")


def locate_jsonl_problem(path: str) -> None:
    """Raise a DataError naming the first line that is not a JSON object or whose field types differ from
    the first row's (the usual reasons Arrow refuses a JSONL file)."""
    first_types: dict[str, type] = {}
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {index}: not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {index}: expected a JSON object, got {type(row).__name__}")
            for field, value in row.items():
                if value is None:
                    continue
                expected = first_types.setdefault(field, type(value))
                if not isinstance(value, expected):
                    raise DataError(
                        f"{path}: row {index}: field {field}: expected {expected.__name__} "
                        f"(as in earlier rows), got {type(value).__name__}"
                    )
                if field in ("messages",) and isinstance(value, list):
                    problem = validate_messages(value, field)
                    if problem:
                        raise DataError(f"{path}: row {index}: {problem}")


def detect_format(columns: list[str], messages_field: str, prompt_field: str, completion_field: str) -> str:
    if messages_field in columns:
        return "messages"
    if prompt_field in columns and completion_field in columns:
        return "prompt_completion"
    raise DataError(
        f"rows have neither a `{messages_field}` column nor `{prompt_field}`+`{completion_field}` "
        f"(columns: {columns}); set data.messages_field / data.prompt_field / data.completion_field"
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
