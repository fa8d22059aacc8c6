"""Tiny random-weight checkpoints for tests and probes: no hub downloads, built in about a second.

`build_tokenizer` trains a small byte-level BPE with `tokenizers` and saves it as a `PreTrainedTokenizerFast`
directory with a ChatML-style chat template; `build_tiny_qwen2` and `build_tiny_deepseek_v3` save fp32 models
with random weights next to it, so every directory loads with `from_pretrained` and with `vllm.LLM`.
`forward_logprobs` (one full forward pass, the trainer's view) and `transformers_greedy` are the references
backends are checked against.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

EOS_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the a one two three four five six seven eight nine ten plus minus times equals answer think step "
    "first then so we have apples pears cat dog sum is of and to in it"
).split()


def _corpus(num_lines: int, rng: random.Random) -> list[str]:
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        numbers = [str(rng.randint(0, 999)) for _ in range(rng.randint(0, 3))]
        lines.append(" ".join(words + numbers) + ".")
    return lines


def build_tokenizer(directory: str | Path, vocab_size: int = 384, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a generated word-problem corpus and save it (with a chat template) there."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(2000, random.Random(seed)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def build_tiny_qwen2(directory: str | Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Save a Qwen2-shaped fp32 model with random weights and a trained BPE tokenizer in `directory`."""
    directory = Path(directory)
    tokenizer = build_tokenizer(directory, seed=seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,  # head_dim 32: vLLM's CPU attention kernel rejects head_dim 16
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # A wider init than the default 0.02 gives peaked next-token distributions, so greedy decoding is
        # decisive (no near-ties between engines) and samples differ visibly from one another.
        initializer_range=0.1,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    _save(Qwen2ForCausalLM(config).eval(), tokenizer, directory)
    return directory


def build_tiny_deepseek_v3(directory: str | Path, seed: int = 0) -> Path:
    """Save a DeepSeek-V3-shaped fp32 model (MLA + sigmoid-routed MoE) with random weights in `directory`.

    vLLM's CPU MLA kernel needs kv_lora_rank + qk_rope_head_dim = 576, hence 512 + 64 even at this size.
    transformers omits `topk_method` and `scoring_func` from the saved config; without them vLLM routes with
    softmax and no correction bias, so they are written in as the released V3 config has them.
    """
    directory = Path(directory)
    tokenizer = build_tokenizer(directory, seed=seed)
    config = DeepseekV3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        kv_lora_rank=512,
        q_lora_rank=32,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=512,
        initializer_range=0.1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    save_deepseek_v3(DeepseekV3ForCausalLM(config).eval(), tokenizer, directory)
    return directory


def save_deepseek_v3(
    model: DeepseekV3ForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: str | Path
) -> None:
    """`save_pretrained`, then write the routing fields vLLM needs and transformers leaves out."""
    directory = Path(directory)
    _save(model, tokenizer, directory)
    config_path = directory / "config.json"
    saved = json.loads(config_path.read_text())
    saved.update(topk_method="noaux_tc", scoring_func="sigmoid")
    config_path.write_text(json.dumps(saved, indent=2))


def forward_logprobs(
    model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """The trainer's view of a completion: log softmax(z/T) at each of its tokens from one full forward pass."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion], device=device)).logits[0, len(prompt) - 1 : -1]
    logprobs = (logits.double().cpu() / temperature).log_softmax(-1)
    return logprobs.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def transformers_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Unbatched transformers greedy decoding (stopping at EOS), the reference for every backend."""
    prompt_ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(prompt_ids, max_new_tokens=max_tokens, do_sample=False, top_k=None)
    return output[0, len(prompt) :].tolist()
