"""RewardBench pairs from a local copy of the data: loading with errors that name the file and row, and
seeded sampling."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    id: str
    subset: str
    prompt: str
    chosen: str
    rejected: str


def _pair_from_row(row: object, where: str, index: int) -> Pair:
    """Validates one record; ``where`` names the file and row for the error message."""
    if not isinstance(row, dict):
        raise ValueError(
            f"{where}: expected an object with prompt/chosen/rejected/subset, got {type(row).__name__}"
        )
    fields = {}
    for name in ("prompt", "chosen", "rejected", "subset"):
        if name not in row or row[name] is None:
            raise ValueError(f"{where}: missing field '{name}'")
        if not isinstance(row[name], str):
            raise ValueError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
        fields[name] = row[name]
    if not fields["subset"].strip():
        raise ValueError(f"{where}: field 'subset' is empty")
    pair_id = row.get("id")
    if pair_id is None:
        pair_id = index
    elif isinstance(pair_id, bool) or not isinstance(pair_id, (int, str)):
        raise ValueError(f"{where}: field 'id' must be an integer or a string, got {type(pair_id).__name__}")
    return Pair(id=str(pair_id), **fields)


def _rows_of_file(path: Path) -> list[tuple[str, object]]:
    """(location, record) for every record of one JSONL, JSON or Parquet file."""
    if path.suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}: line {line_number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number}: invalid JSON ({error.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json file must hold a list of records; use .jsonl for one per line")
        return [(f"{path}: record {i + 1}", record) for i, record in enumerate(records)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}: row {i + 1}", record) for i, record in enumerate(pq.read_table(path).to_pylist())]
    raise ValueError(f"{path}: unsupported file type '{path.suffix}' (expected .jsonl, .json or .parquet)")


def _rows_of_saved_dataset(path: Path) -> list[tuple[str, object]]:
    """Records of a ``datasets`` ``save_to_disk`` directory (a Dataset, or a DatasetDict with one split or a
    'filtered' split, RewardBench's name for its evaluation split)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "filtered" in loaded:
            split = "filtered"
        elif len(loaded) == 1:
            split = next(iter(loaded))
        else:
            raise ValueError(f"{path}: dataset has splits {sorted(loaded)}; save the split to evaluate alone")
        loaded = loaded[split]
    return [(f"{path}: row {i + 1}", record) for i, record in enumerate(loaded)]


def load_pairs(path: str | Path) -> list[Pair]:
    """Loads RewardBench-format pairs (columns ``prompt``, ``chosen``, ``rejected``, ``subset``, optional
    ``id``; other columns such as ``chosen_model`` are ignored) from a .jsonl/.json/.parquet file, a
    ``datasets.save_to_disk`` directory, or a directory of such files (read in name order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"RewardBench data not found: {path}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            rows = _rows_of_saved_dataset(path)
        else:
            files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
            if not files:
                raise ValueError(f"{path}: no .jsonl, .json or .parquet files and no saved dataset")
            rows = [row for file in files for row in _rows_of_file(file)]
    else:
        rows = _rows_of_file(path)
    if not rows:
        raise ValueError(f"{path}: no pairs")
    pairs = [_pair_from_row(record, where, index) for index, (where, record) in enumerate(rows)]
    first_seen: dict[str, str] = {}
    for (where, _), pair in zip(rows, pairs, strict=True):
        if pair.id in first_seen:
            raise ValueError(f"{where}: duplicate id '{pair.id}' (first at {first_seen[pair.id]})")
        first_seen[pair.id] = where
    return pairs


def sample_pairs(pairs: Sequence[Pair], max_pairs: int | None, seed: int) -> list[Pair]:
    """A seeded uniform sample of at most ``max_pairs`` pairs, in file order (subsets keep their share)."""
    if max_pairs is None or max_pairs >= len(pairs):
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), max_pairs))
    return [pairs[i] for i in keep]


def conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
