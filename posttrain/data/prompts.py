"""Prompt datasets for GRPO, trace generation and evaluation: a prompt plus the columns rewards need.

A row holds `prompt` (a string or a list of chat messages) and any other columns (`answer`, `tests`, …), which
reach the reward functions as keyword lists, one value per completion (TRL's reward shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from posttrain.data.chat import encode_prompt
from posttrain.data.rows import DataError, load_rows, row_where, validate_messages


@dataclass
class PromptSet:
    messages: list[list[dict[str, str]]]
    prompt_ids: list[list[int]]
    columns: dict[str, list[Any]]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: list[int]) -> PromptSet:
        return PromptSet(
            [self.messages[i] for i in indices],
            [self.prompt_ids[i] for i in indices],
            {k: [v[i] for i in indices] for k, v in self.columns.items()},
            [self.sources[i] for i in indices],
        )


def load_prompts(
    sources: list[str],
    tokenizer: PreTrainedTokenizerBase,
    prompt_field: str = "prompt",
    system_prompt: str | None = None,
    max_prompt_tokens: int | None = None,
) -> PromptSet:
    """Read, validate and tokenise prompts; errors name the file, row and field."""
    messages: list[list[dict[str, str]]] = []
    columns: dict[str, list[Any]] = {}
    origin: list[str] = []
    row_index: list[int] = []  # each prompt's row in its source
    for source in sources:
        rows = load_rows(source)
        if prompt_field not in rows.column_names:
            raise DataError(f"no `{prompt_field}` column (columns: {rows.column_names})", file=source)
        for index, row in enumerate(rows):
            prompt = row[prompt_field]
            if isinstance(prompt, str) and prompt.strip():
                conversation = [{"role": "user", "content": prompt}]
            else:
                problem = validate_messages(prompt, prompt_field, need_assistant=False)
                if problem:
                    raise DataError(problem, file=source, where=row_where(source, index))
                conversation = [{"role": m["role"], "content": m["content"]} for m in prompt]
            if system_prompt is not None and conversation[0]["role"] != "system":
                conversation = [{"role": "system", "content": system_prompt}, *conversation]
            messages.append(conversation)
            origin.append(source)
            row_index.append(index)
            for key, value in row.items():
                if key != prompt_field:
                    columns.setdefault(key, [None] * (len(messages) - 1)).append(value)
        for values in columns.values():
            values.extend([None] * (len(messages) - len(values)))
    prompt_ids = [encode_prompt(tokenizer, conversation) for conversation in messages]
    if max_prompt_tokens is not None:
        for index, ids in enumerate(prompt_ids):
            if len(ids) > max_prompt_tokens:
                raise DataError(
                    f"the prompt has {len(ids)} tokens > max_prompt_tokens {max_prompt_tokens}",
                    file=origin[index],
                    where=row_where(origin[index], row_index[index]),
                    field=prompt_field,
                )
    return PromptSet(messages, prompt_ids, columns, origin)
