from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.generation.testing import build_tiny_qwen2

QUESTIONS = ["two plus three", "what is seven times eight and then minus one", "sum of 12 and 30", "the cat"]


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tokenizer(qwen2_dir):
    return AutoTokenizer.from_pretrained(qwen2_dir)


@pytest.fixture
def model(qwen2_dir):
    return AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    """Chat-formatted prompts of different lengths, so batches are left-padded."""
    return [
        list(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
                "input_ids"
            ]
        )
        for q in QUESTIONS
    ]
