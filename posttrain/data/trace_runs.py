"""A finished trace run (`posttrain traces`) read as SFT data: its accepted shards, listed in its summary.

Here rather than in `posttrain.traces` so that what reads traces (distillation) does not depend on what writes
them: the run's directory layout (`ledger.jsonl`, `summary.json` with `accepted_files`) is the contract.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.data.rows import DataError


def accepted_files(output_dir: str | Path) -> list[str]:
    """The accepted shards of a finished trace run (listed in its summary), for `datasets` or SFT."""
    summary = Path(output_dir) / "summary.json"
    if not summary.exists():
        raise DataError(
            "no summary.json, so the trace run has not finished; finish it with "
            "`posttrain traces RECIPE --resume` first",
            file=str(output_dir),
        )
    return json.loads(summary.read_text())["accepted_files"]


def trace_sources(sources: list[str]) -> list[str]:
    """Data sources with every trace run directory replaced by its accepted shards."""
    expanded: list[str] = []
    for source in sources:
        is_trace_run = Path(source).is_dir() and (Path(source) / "ledger.jsonl").exists()
        expanded.extend(accepted_files(source) if is_trace_run else [source])
    return expanded
