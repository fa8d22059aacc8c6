"""Generative judges (LLM-as-judge) through any text generator: pointwise scores and pairwise verdicts.

A generator is any ``TextGenerator``: a batch of chat message lists in, one completion per list out. Two are
here: ``OpenAIChatGenerator`` (an OpenAI-compatible ``/chat/completions`` endpoint: vLLM serve, a hosted API)
and ``TransformersGenerator`` (a local model). Judge prompts are editable templates (``str.format`` fields).
A verdict or score that cannot be read from the judge's text is counted as unparseable, never guessed.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rewards.registry import message_text, register

Messages = list[dict[str, Any]]
TextGenerator = Callable[[list[Messages]], list[str]]


class GenerationError(RuntimeError):
    """A generator could not produce a completion (after its retries)."""


# ---------------------------------------------------------------- generators


class OpenAIChatGenerator:
    """Calls ``{base_url}/chat/completions`` once per conversation, ``concurrency`` requests at a time.

    Connection errors, timeouts, HTTP 429 and 5xx are retried ``retries`` times with exponential back-off
    (``backoff_s * 2**attempt`` plus jitter, or the server's ``Retry-After``); other HTTP errors are raised at
    once, since repeating a bad request cannot help.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        concurrency: int = 8,
        extra_body: dict[str, Any] | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.concurrency = concurrency
        self.extra_body = extra_body or {}

    def __call__(self, batch: list[Messages]) -> list[str]:
        if len(batch) <= 1:
            return [self._complete(messages) for messages in batch]
        with ThreadPoolExecutor(min(self.concurrency, len(batch))) as executor:
            return list(executor.map(self._complete, batch))

    def _complete(self, messages: Messages) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        attempt = 0
        while True:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return _message_content(json.loads(response.read()), self.url)
            except urllib.error.HTTPError as exc:
                retryable = exc.code == 429 or exc.code >= 500
                failure = f"HTTP {exc.code} from {self.url}: {exc.read()[:500].decode(errors='replace')}"
                wait_s = _retry_after(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                retryable, failure, wait_s = True, f"{self.url}: {exc}", None
            attempt += 1
            if not retryable or attempt > self.retries:
                raise GenerationError(f"{failure} (after {attempt} attempt(s))")
            backoff_s = self.backoff_s * 2 ** (attempt - 1) * (1 + random.random() / 4)
            time.sleep(wait_s if wait_s is not None else backoff_s)


def _message_content(reply: Any, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise GenerationError(
            f"{url} answered without choices[0].message.content: {str(reply)[:300]}"
        ) from None
    return content or ""


def _retry_after(header: str | None) -> float | None:
    try:
        return min(float(header), 60.0) if header else None
    except ValueError:
        return None


def _checkpoint_source(path: str) -> dict[str, str]:
    """from_pretrained arguments for a checkpoint directory, or for a GGUF file (transformers dequantises it)."""
    if path.endswith(".gguf"):
        directory, _, name = path.rpartition("/")
        return {"pretrained_model_name_or_path": directory or ".", "gguf_file": name}
    return {"pretrained_model_name_or_path": path}


class TransformersGenerator:
    """A local causal LM: each conversation goes through the tokenizer's chat template, batches are
    left-padded, and generation is greedy (``temperature == 0``) or sampled."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer if tokenizer is not None else model
            model = AutoModelForCausalLM.from_pretrained(**_checkpoint_source(model))
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(**_checkpoint_source(tokenizer))
        if tokenizer is None:
            raise ValueError("TransformersGenerator: pass a tokenizer (or a model path that holds one)")
        if not tokenizer.chat_template:
            raise ValueError("TransformersGenerator: the tokenizer has no chat template")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"  # new tokens must follow the prompt directly
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size

    def __call__(self, batch: list[Messages]) -> list[str]:
        import torch

        outputs = []
        for start in range(0, len(batch), self.batch_size):
            texts = [
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                for messages in batch[start : start + self.batch_size]
            ]
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = inputs.to(self.model.device)
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
            with torch.no_grad():
                generated = self.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **(sampling if self.temperature > 0 else {"do_sample": False}),
                )
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            outputs += self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return outputs


# ---------------------------------------------------------------- templates and parsing

POINTWISE_TEMPLATE = """Please act as an impartial judge and evaluate the quality of the response provided by an \
AI assistant to the user question below. Consider helpfulness, relevance, accuracy, depth and level of \
detail. Begin with a short explanation, then rate the response on a scale of 1 to 10 by writing your rating \
strictly in this format: "Rating: [[5]]".

[Question]
{prompt}

[The Start of the Assistant's Answer]
{response}
[The End of the Assistant's Answer]"""

PAIRWISE_TEMPLATE = """Please act as an impartial judge and evaluate the quality of the responses provided by two \
AI assistants to the user question below. Choose the assistant that follows the user's instructions and \
answers the question better, considering helpfulness, relevance, accuracy, depth and level of detail. Do not \
let the order of the responses, their length or the assistants' names influence you. Begin with a short \
explanation, then give your final verdict strictly in this format: "[[A]]" if assistant A is better, "[[B]]" \
if assistant B is better, "[[C]]" for a tie.

[User Question]
{prompt}

[The Start of Assistant A's Answer]
{response_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{response_b}
[The End of Assistant B's Answer]"""

LETTER_TEMPLATE = """Question: {prompt}

Answer A: {response_a}

Answer B: {response_b}

Which answer is better, A or B? Reply with the letter only."""
"""For small judges: the default template's explanation-then-verdict is beyond a 135M model (SmolLM2-135M-Instruct
restates the question and never writes a verdict), while a bare letter it does write."""

_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
# A reply whose first line is nothing but the verdict: "A", "**B**", "[A]", "B.", "Answer A", "Assistant B".
_BARE_VERDICT = re.compile(
    r"[\s*\[(]*(?:(?:answer|assistant|response)\s+)?(A|B|C|tie)[\s*\]).:!]*", re.IGNORECASE
)
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]|rating\s*[:=]\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_pairwise_verdict(text: str) -> str:
    """``"A"``, ``"B"`` or ``"tie"`` from the judge's ``[[A]]``, ``[[B]]``, ``[[C]]`` / ``[[tie]]``, or from a
    first line that is the verdict alone (``A``, ``**B**``, ``Answer A.``: what LETTER_TEMPLATE asks for). A
    text with no verdict, or with two different bracketed ones, is ``"unparseable"``: never guessed from prose
    such as "Assistant A is better", which may go on to say the opposite."""
    found = set(_VERDICT.findall(text))
    if not found and (bare := _BARE_VERDICT.fullmatch(text.strip().split("\n", 1)[0])):
        found = {bare.group(1)}
    verdicts = {"tie" if verdict.upper() in ("C", "TIE") else verdict.upper() for verdict in found}
    return verdicts.pop() if len(verdicts) == 1 else "unparseable"


def parse_pointwise_score(text: str) -> float | None:
    """The 1-10 rating from ``[[7]]`` or ``Rating: 7``; ``None`` if there is none, two different ones, or one
    outside 1-10."""
    ratings = {float(bracketed or plain) for bracketed, plain in _RATING.findall(text)}
    if len(ratings) != 1:
        return None
    rating = ratings.pop()
    return rating if 1 <= rating <= 10 else None


def render(template: str, **fields: Any) -> str:
    """``template.format(**fields)`` with an error that names a field the template asks for but nobody gave."""
    try:
        return template.format(**fields)
    except KeyError as exc:
        raise KeyError(f"judge template asks for field {exc} but only {sorted(fields)} are given") from None


# ---------------------------------------------------------------- judges


class PointwiseJudge:
    """Rates each response 1-10; as a reward (``__call__``) the mean rating over ``votes`` samples is mapped
    to [0, 1] as (rating - 1) / 9. A response with no readable rating in any vote scores ``None``.

    The template's fields are ``{prompt}``, ``{response}`` and, as a reward, any string column of the row
    (e.g. ``{answer}`` for reference-guided judging).
    """

    def __init__(self, generate: TextGenerator, template: str | None = None, votes: int = 1):
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        self.generate, self.template, self.votes = generate, template or POINTWISE_TEMPLATE, votes
        self.unparseable = 0  # votes whose rating could not be read, since construction

    def ratings(self, prompts: list, responses: list, rows: list[dict] | None = None) -> list[float | None]:
        """Mean 1-10 rating per response over the votes that parsed, or ``None`` if none did."""
        rows = rows or [{} for _ in prompts]
        conversations = [
            [{"role": "user", "content": render(self.template, **row, prompt=prompt, response=response)}]
            for prompt, response, row in zip(
                [message_text(p, "user") for p in prompts],
                [message_text(r) for r in responses],
                rows,
                strict=True,
            )
            for _ in range(self.votes)
        ]
        parsed = [parse_pointwise_score(text) for text in self.generate(conversations)]
        self.unparseable += sum(score is None for score in parsed)
        means: list[float | None] = []
        for start in range(0, len(parsed), self.votes):
            votes = [score for score in parsed[start : start + self.votes] if score is not None]
            means.append(sum(votes) / len(votes) if votes else None)
        return means

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        rows = [
            {key: values[i] for key, values in columns.items() if isinstance(values[i], str)}
            for i in range(len(completions))
        ]
        return [None if r is None else (r - 1) / 9 for r in self.ratings(prompts, completions, rows)]


class PairwiseJudge:
    """Compares two responses to a prompt. With ``both_orders`` each pair is judged as (a, b) and as (b, a),
    cancelling the judge's position bias; each order is sampled ``votes`` times (use a sampling generator for
    votes > 1). Verdicts are mapped back to the original labels."""

    def __init__(
        self, generate: TextGenerator, template: str | None = None, votes: int = 1, both_orders: bool = True
    ):
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        self.generate, self.template = generate, template or PAIRWISE_TEMPLATE
        self.votes, self.both_orders = votes, both_orders
        self.unparseable = 0  # verdicts that could not be read, since construction

    def verdicts(self, prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[list[str]]:
        """Per pair, one verdict per (order, vote): "A", "B", "tie" or "unparseable", in the original labels
        (order (a, b) first, then (b, a))."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(
                f"{len(prompts)} prompts, {len(responses_a)} responses_a and {len(responses_b)} responses_b"
            )
        orders = (False, True) if self.both_orders else (False,)
        conversations = []
        for prompt, a, b in zip(prompts, responses_a, responses_b, strict=True):
            prompt, a, b = message_text(prompt, "user"), message_text(a), message_text(b)
            for swapped in orders:
                first, second = (b, a) if swapped else (a, b)
                content = render(self.template, prompt=prompt, response_a=first, response_b=second)
                conversations += [[{"role": "user", "content": content}]] * self.votes
        texts = self.generate(conversations)
        if len(texts) != len(conversations):
            raise GenerationError(
                f"the generator returned {len(texts)} texts for {len(conversations)} conversations"
            )
        swap = {"A": "B", "B": "A", "tie": "tie", "unparseable": "unparseable"}
        per_pair = len(orders) * self.votes
        result = []
        for start in range(0, len(texts), per_pair):
            verdicts = [parse_pairwise_verdict(text) for text in texts[start : start + per_pair]]
            result.append([swap[v] if k >= self.votes else v for k, v in enumerate(verdicts)])
        self.unparseable += sum(v == "unparseable" for pair in result for v in pair)
        return result


@register("llm_judge")
def llm_judge(
    prompts: list,
    completions: list,
    base_url: str,
    model: str,
    template: str | None = None,
    votes: int = 1,
    temperature: float = 0.0,
    api_key_env: str | None = None,
    **columns: Any,
) -> list[float | None]:
    """Pointwise judging through an OpenAI-compatible endpoint, as a recipe reward:
    r = (mean rating - 1) / 9 in [0, 1]; ``None`` when no vote gave a readable rating. The API key, if any,
    is read from the environment variable named ``api_key_env``, so that recipes never hold keys."""
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ValueError(f"llm_judge: environment variable {api_key_env} (api_key_env) is not set")
    generate = OpenAIChatGenerator(base_url, model, api_key=api_key, temperature=temperature)
    return PointwiseJudge(generate, template, votes)(prompts, completions, **columns)
