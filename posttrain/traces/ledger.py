"""Append-only JSONL shards with a commit ledger: a trace run killed at any moment (SIGKILL included) resumes
with no duplicate and no lost prompt.

Work is committed one batch of prompts at a time. A batch's rows are appended to the current part of each
stream (`accepted/`, `samples/`, `failed/`) and fsync'ed; only then is one line appended to `ledger.jsonl`
naming the batch and, for every stream, the part and its byte size after the batch. The ledger line is the
commit point:

* killed before it is complete: on resume the torn line is dropped, every stream is truncated back to the
  sizes of the last committed line, and the batch runs again — its rows appear once;
* killed after it: the batch is done and is skipped.

Parts that earlier lines closed are never written again, so `datasets` can read them while a run goes on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from posttrain.errors import RunExistsError

STREAMS = ("accepted", "samples", "failed")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _part_name(index: int) -> str:
    return f"part-{index:05d}.jsonl"


class TraceLedger:
    """The shards and ledger under `root`; `done` holds the batch ids already committed."""

    def __init__(self, root: Path, shard_rows: int) -> None:
        self.root = Path(root)
        self.shard_rows = shard_rows
        self.path = self.root / "ledger.jsonl"
        self.done: set[int] = set()
        # Per stream: current part index, rows in that part, its committed byte size, rows in all parts.
        self.state = {name: {"part": 0, "part_rows": 0, "bytes": 0, "rows": 0} for name in STREAMS}

    def open(self, resume: bool) -> None:
        """Create the layout, or (resume) restore the last committed state and discard anything after it."""
        for name in STREAMS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        entries = self._read_committed()
        if entries and not resume:
            raise RunExistsError(
                f"output_dir already holds {len(entries)} committed batches: pass --resume to continue that "
                "run, --overwrite to delete it and start afresh, or choose another output_dir",
                file=str(self.root),
            )
        if entries:
            self.state = entries[-1]["streams"]
            self.done = {entry["batch"] for entry in entries}
        for name in STREAMS:
            self._truncate_stream(name)

    def _read_committed(self) -> list[dict[str, Any]]:
        """Ledger lines that were written completely; a torn last line is cut off the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        entries, good = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
        if good < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(good)
        return entries

    def _truncate_stream(self, name: str) -> None:
        """Cut the current part back to its committed size and delete parts no commit has named."""
        state = self.state[name]
        for part in (self.root / name).glob("part-*.jsonl"):
            index = int(part.stem.removeprefix("part-"))
            if index > state["part"]:
                part.unlink()
        current = self.root / name / _part_name(state["part"])
        if current.exists() and current.stat().st_size > state["bytes"]:
            with current.open("r+b") as handle:
                handle.truncate(state["bytes"])

    def commit(self, batch: int, prompt_indices: list[int], rows: dict[str, list[dict[str, Any]]]) -> None:
        """Append the batch's rows to their streams, make them durable, then write the ledger line."""
        for name in STREAMS:
            if rows.get(name):
                self._append(name, rows[name])
        entry = {"batch": batch, "prompts": prompt_indices, "streams": self.state}
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done.add(batch)

    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        state = dict(self.state[name])
        if state["part_rows"] >= self.shard_rows:
            state.update(part=state["part"] + 1, part_rows=0, bytes=0)
        path = self.root / name / _part_name(state["part"])
        created = not path.exists()
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        with path.open("ab") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            _fsync_dir(path.parent)
        state["bytes"] += len(payload)
        state["part_rows"] += len(rows)
        state["rows"] += len(rows)
        self.state = {**self.state, name: state}

    def parts(self, name: str) -> list[Path]:
        """The committed parts of a stream, in order (what `datasets` should load)."""
        state = self.state[name]
        paths = [self.root / name / _part_name(i) for i in range(state["part"] + 1)]
        return [p for p in paths if p.exists() and p.stat().st_size > 0]

    def read(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for part in self.parts(name) for line in part.read_text().splitlines()]
