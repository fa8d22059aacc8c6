"""From recipe data sources to tokenised samples ready for packing.

Rows are validated, templated and tokenised in parallel with `datasets.map` (cached on disk by `datasets`, so
a second run with the same data, tokenizer and settings does no work). Bad rows either stop the run with
file/row/field (`on_bad_row: error`) or are skipped and listed in the run log; over-long samples are truncated
or dropped by `overlong`, and counted. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from posttrain.config import DataSection
from posttrain.data.chat import TemplateError, encode_conversation
from posttrain.data.packing import TokenizedSamples
from posttrain.data.rows import DataError, detect_format, load_rows, row_to_messages, row_where

log = logging.getLogger(__name__)


@dataclass
class DataReport:
    """What happened to every row: how many were used, skipped (and why), truncated or dropped."""

    rows: int = 0
    used: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped_overlong: list[str] = field(default_factory=list)
    no_targets: list[str] = field(default_factory=list)
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "used": self.used,
            "skipped": len(self.skipped),
            "skipped_rows": self.skipped[:1000],
            "truncated": self.truncated,
            "dropped_overlong": len(self.dropped_overlong),
            "dropped_overlong_rows": self.dropped_overlong[:1000],
            "dropped_no_targets": len(self.no_targets),
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
        }


def _tokenize_source(
    source: str, cfg: DataSection, tokenizer: PreTrainedTokenizerBase, cache_dir: str | None
) -> datasets.Dataset:
    rows = load_rows(source, cache_dir=cache_dir)
    fmt = cfg.format if cfg.format != "auto" else None
    fmt = fmt or detect_format(
        source, rows.column_names, cfg.messages_field, cfg.prompt_field, cfg.completion_field
    )

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        messages, problem = row_to_messages(
            row, fmt, cfg.messages_field, cfg.prompt_field, cfg.completion_field, cfg.system_prompt
        )
        ids: list[int] = []
        mask: list[bool] = []
        if problem is None:
            try:
                ids, mask = encode_conversation(tokenizer, messages, cfg.loss_on)
            except TemplateError as exc:
                problem = f"chat template: {exc}"
        status = ""
        if problem is not None:
            if cfg.on_bad_row == "error":
                raise DataError(problem, file=source, where=row_where(source, index))
            status = f"{source}: {row_where(source, index)}: {problem}"
        elif len(ids) > cfg.max_seq_len:
            if cfg.overlong == "drop":
                status = (
                    f"overlong:{source}: {row_where(source, index)}: {len(ids)} tokens > max_seq_len "
                    f"{cfg.max_seq_len}"
                )
                ids, mask = [], []
            else:
                ids, mask = ids[: cfg.max_seq_len], mask[: cfg.max_seq_len]
                status = "truncated"
        if ids and not any(mask[1:]):
            status = f"notargets:{source}: {row_where(source, index)}: no target tokens left"
        return {"input_ids": ids, "loss_mask": mask, "status": status}

    return rows.map(
        encode,
        with_indices=True,
        remove_columns=rows.column_names,
        num_proc=cfg.num_proc if cfg.num_proc > 1 and len(rows) >= 4 * cfg.num_proc else None,
        desc=f"tokenising {source}",
        features=datasets.Features(
            {
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "loss_mask": datasets.Sequence(datasets.Value("bool")),
                "status": datasets.Value("string"),
            }
        ),
    )


def _flat(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    array = column.combine_chunks()
    offsets = np.asarray(array.offsets, dtype=np.int64)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def build_sft_samples(
    cfg: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str] | None = None,
    cache_dir: str | None = None,
) -> tuple[TokenizedSamples, DataReport]:
    """Validate, template and tokenise every source; return the kept samples and the accounting."""
    report = DataReport()
    kept: list[datasets.Dataset] = []
    sources = sources if sources is not None else cfg.train
    for source in sources:
        encoded = _tokenize_source(source, cfg, tokenizer, cache_dir)
        report.rows += len(encoded)
        statuses = encoded["status"]
        good = []
        for i, status in enumerate(statuses):
            if status.startswith("overlong:"):
                report.dropped_overlong.append(status.removeprefix("overlong:"))
            elif status.startswith("notargets:"):
                report.no_targets.append(status.removeprefix("notargets:"))
            elif status and status != "truncated":
                report.skipped.append(status)
            else:
                report.truncated += status == "truncated"
                good.append(i)
        kept.append(encoded.select(good) if len(good) < len(encoded) else encoded)
    for message in report.skipped[:20]:
        log.warning("skipped %s", message)
    if report.skipped:
        log.warning("skipped %d malformed rows (data.on_bad_row=skip)", len(report.skipped))
    merged = datasets.concatenate_datasets(kept) if len(kept) > 1 else kept[0]
    table = merged.with_format("arrow")[:]
    input_ids, offsets = _flat(table.column("input_ids"))
    loss_mask, _ = _flat(table.column("loss_mask"))
    report.used = len(offsets) - 1
    if report.used == 0:
        first = (report.skipped + report.dropped_overlong + report.no_targets)[:1]
        raise DataError(
            f"no usable rows in {', '.join(sources)}: of {report.rows}, {len(report.skipped)} malformed, "
            f"{len(report.dropped_overlong)} over data.max_seq_len, {len(report.no_targets)} without target "
            f"tokens{'; first: ' + first[0] if first else ''}"
        )
    report.tokens = int(offsets[-1])
    report.target_tokens = int(loss_mask.sum())
    samples = TokenizedSamples(input_ids=input_ids, loss_mask=loss_mask.astype(bool), offsets=offsets)
    return samples, report
