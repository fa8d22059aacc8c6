from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from posttrain.generation.testing import build_tokenizer


def build_tiny_reward_model(directory: Path, seed: int = 0) -> Path:
    """A Qwen2 sequence classifier with one output (the reward), random weights, and a trained BPE tokenizer."""
    tokenizer = build_tokenizer(directory, seed=seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    Qwen2ForSequenceClassification(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bundled_pairs(repo_root) -> Path:
    """The synthetic pair file written by posttrain/evals/make_pairs.py."""
    return repo_root / "data" / "rewardbench" / "pairs.jsonl"
