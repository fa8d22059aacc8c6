"""Chat templates and loss masks.

The tokenizer's own chat template renders the conversation. To know which tokens belong to assistant turns
without special `{% generation %}` markers in the template, we render growing prefixes of the conversation:
the text that `messages[:k]` + generation prompt adds is the prompt segment of turn k, and the text that
`messages[:k+1]` adds beyond that is the assistant's answer (including the template's end-of-turn marker, so
the model learns to stop). Segments are tokenised separately and concatenated; templates put special tokens at
segment borders, so this equals tokenising the whole text for every template we know, and a template whose
prefixes do not nest (e.g. one that rewrites earlier turns) is refused with a clear message.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from posttrain.data.rows import DataError, load_rows, row_where, validate_messages


class TemplateError(ValueError):
    pass


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def conversation_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_answer) segments whose concatenation is the
    template's rendering of the whole conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template; give it one (tokenizer_config.json: chat_template)"
        )
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], add_generation_prompt=True)
        after = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not before.startswith(rendered) or not after.startswith(before):
            raise TemplateError(
                f"the chat template does not render turn {k} as an extension of the earlier turns "
                "(it rewrites history), so assistant tokens cannot be located; use data.loss_on=all "
                "or a template without history rewriting"
            )
        if len(before) > len(rendered):
            segments.append((before[len(rendered) :], False))
        segments.append((after[len(before) :], True))
        rendered = after
    full = _render(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(rendered):
        raise TemplateError("the chat template renders the full conversation differently from its prefixes")
    if len(full) > len(rendered):
        segments.append((full[len(rendered) :], False))
    return segments


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], loss_on: str = "assistant"
) -> tuple[list[int], list[bool]]:
    """Token ids of the templated conversation and, per token, whether it is a training target.

    `loss_on="assistant"` trains on assistant answers only; `"all"` on every token (the first token of a
    sequence has no prediction and is dropped by the shift in the loss either way).
    """
    input_ids: list[int] = []
    loss_mask: list[bool] = []
    for text, is_answer in conversation_segments(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        loss_mask.extend([is_answer or loss_on == "all"] * len(ids))
    return input_ids, loss_mask


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt ready for generation (the template's assistant header appended)."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_token_ids(
    sources: list[str], tokenizer: PreTrainedTokenizerBase, rows_per_source: int = 32, max_tokens: int = 512
) -> list[list[int]]:
    """Token ids of the first `rows_per_source` conversations (`messages` rows, as SFT data) of each source, each
    rendered by the tokenizer's chat template and cut at `max_tokens`: calibration text, e.g. for choosing the
    layers of a student (posttrain.model.student)."""
    samples = []
    for source in sources:
        rows = load_rows(source)
        if "messages" not in rows.column_names:
            raise DataError(
                f"calibration rows need a `messages` column (columns: {rows.column_names})", file=source
            )
        for index in range(min(rows_per_source, len(rows))):
            messages = rows[index]["messages"]
            if problem := validate_messages(messages, need_assistant=False):
                raise DataError(problem, file=source, where=row_where(source, index))
            samples.append(encode_conversation(tokenizer, messages)[0][:max_tokens])
    if not samples:
        raise DataError(f"no conversations in {', '.join(sources)}")
    return samples
