"""The trainers' shared per-step metrics: on CUDA each row carries the process's peak allocated memory (what the
benchmarks compare with TRL's), read from the allocator's bookkeeping; elsewhere no memory key at all."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from posttrain.config import LoggingSection
from posttrain.trainers.loop import Progress


def _rows_written(tmp_path, device: str) -> list[dict]:
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device(device))
    progress = Progress(accelerator, tmp_path, LoggingSection(tensorboard=False, progress=False), 2, 0)
    progress.step(1, {"loss": 1.5}, {})
    progress.step(2, {"loss": 1.25}, {})
    progress.close()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_rows_on_cuda_carry_the_allocators_peak_in_gib(tmp_path, monkeypatch):
    peaks = iter([3 * 2**30, 5 * 2**30 + 2**29])
    asked = []

    def max_memory_allocated(device):
        asked.append(device)
        return next(peaks)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_memory_allocated)
    rows = _rows_written(tmp_path, "cuda")
    assert [(r["step"], r["loss"], r["memory/peak_gib"]) for r in rows] == [(1, 1.5, 3.0), (2, 1.25, 5.5)]
    assert asked == [torch.device("cuda")] * 2


def test_rows_on_cpu_have_no_memory_key(tmp_path):
    rows = _rows_written(tmp_path, "cpu")
    assert [sorted(r) for r in rows] == [["loss", "step", "time"]] * 2
