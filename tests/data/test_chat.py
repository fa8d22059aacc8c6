"""Chat templating and the assistant-only loss mask, checked against the template's own rendering."""

from __future__ import annotations

import pytest

from posttrain.data.chat import TemplateError, encode_conversation

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Ada has 3 pens and gets 4 more."},
    {"role": "assistant", "content": "<think>\n3 + 4 = 7\n</think>\nThe answer is \\boxed{7}."},
    {"role": "user", "content": "And one more?"},
    {"role": "assistant", "content": "8"},
]


def test_tokens_equal_the_template_rendering_tokenised_whole(tokenizer):
    ids, _ = encode_conversation(tokenizer, MESSAGES)
    whole = tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)
    assert ids == whole["input_ids"]


def test_loss_mask_covers_exactly_the_assistant_answers_and_their_end_marker(tokenizer):
    ids, mask = encode_conversation(tokenizer, MESSAGES)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    expected = "".join(m["content"] + "<|im_end|>\n" for m in MESSAGES if m["role"] == "assistant")
    assert trained == expected
    _, all_mask = encode_conversation(tokenizer, MESSAGES, loss_on="all")
    assert all(all_mask)


def test_template_that_rewrites_history_is_refused(tokenizer):
    rewriting = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    rewriting.chat_template = (
        "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="turn 4"):
        encode_conversation(rewriting, MESSAGES)
