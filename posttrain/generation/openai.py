"""Rollouts from a separate server speaking the OpenAI completions API (`vllm serve`, or any compatible one).

Prompts are sent as token ids, one request per prompt (concurrently), with logprobs=1 so each choice carries
the sampled tokens' log-probs. Token ids come back through vLLM's `return_token_ids` extension, or parsed
from `return_tokens_as_token_ids` strings ("token_id:42"); a server that offers neither is rejected.

The log-probs are what the server reports. They follow the definition of `base.py` (log softmax(z/T) before
top-p) only for a vLLM server started with `--logprobs-mode processed_logprobs` and requests with top_p = 1:
vLLM's default mode returns log softmax(z) before temperature, and its processed mode renormalises over the
nucleus. Other servers give no such guarantee.

vLLM may notice a stop string a few tokens late (while a UTF-8 character is incomplete) and return those extra
token ids; given the model's `tokenizer`, the client cuts them as the other backends do.

Weights are not pushed from here: vLLM 0.32's HTTP weight-transfer API (init_weight_transfer_engine /
update_weights) moves the tensors themselves over GPU transports (NCCL, CUDA IPC, RDMA-based engines), which
this CPU-only project cannot exercise or test, so `sync_weights` raises. Use the colocated `vllm` backend for
on-policy RL, or restart the server on a new checkpoint.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from posttrain.generation.base import (
    Completion,
    SamplingParams,
    check_prompts,
    first_stop,
    tokens_through_stop,
)

_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class ServerError(RuntimeError):
    """The server answered with an error or with a response we cannot use."""


class OpenAIBackend:
    """Client for `{base_url}/completions`, e.g. base_url="http://127.0.0.1:8000/v1"."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_concurrency: int = 16,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        check_prompts(prompt_ids)
        requests = [self._request_body(ids, params, index) for index, ids in enumerate(prompt_ids)]
        responses = list(self.pool.map(self._post_with_retries, requests))
        return [[self._trim_after_stop(c, params) for c in _completions(r, params.n)] for r in responses]

    def _trim_after_stop(self, completion: Completion, params: SamplingParams) -> Completion:
        if self.tokenizer is None or not params.stop or completion.finish_reason != "stop":
            return completion
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        if first_stop(decode(completion.token_ids), params.stop) is None:
            return completion  # ended by EOS
        length = tokens_through_stop(completion.token_ids, params.stop, decode)
        return replace(
            completion, token_ids=completion.token_ids[:length], logprobs=completion.logprobs[:length]
        )

    def _request_body(self, ids: list[int], params: SamplingParams, prompt_index: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": ids,
            "n": params.n,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": 1,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed + prompt_index * params.n  # as in the vllm backend: distinct streams
        return body

    def _post_with_retries(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with exponential back-off on connection errors and 408/429/5xx; other errors raise at once."""
        data = json.dumps(body).encode()
        attempt = 0
        while True:
            request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:500]
                if error.code not in _RETRYABLE_STATUS or attempt == self.max_retries:
                    raise ServerError(f"{self.url} answered HTTP {error.code}: {detail}") from error
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                if attempt == self.max_retries:
                    raise ServerError(
                        f"{self.url} unreachable after {attempt + 1} attempts: {error}"
                    ) from error
            time.sleep(self.backoff_s * 2**attempt)
            attempt += 1

    def sync_weights(self, model: torch.nn.Module) -> None:
        raise NotImplementedError(
            "OpenAIBackend does not push weights into a separate server (vLLM's weight-transfer API needs a GPU "
            "transport such as NCCL or CUDA IPC between trainer and server). Use the colocated 'vllm' backend "
            "for on-policy RL, or save a checkpoint and restart the server on it."
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _completions(response: dict[str, Any], n: int) -> list[Completion]:
    choices = sorted(response.get("choices") or [], key=lambda choice: choice["index"])
    if len(choices) != n:
        raise ServerError(f"asked for n={n} completions, the server returned {len(choices)}")
    return [_completion(choice) for choice in choices]


def _completion(choice: dict[str, Any]) -> Completion:
    logprobs = choice.get("logprobs") or {}
    token_logprobs = logprobs.get("token_logprobs")
    if token_logprobs is None:
        raise ServerError(f"choice {choice.get('index')} has no logprobs.token_logprobs")
    token_ids = choice.get("token_ids")
    if token_ids is None:
        token_ids = [_parse_token_id(token) for token in logprobs.get("tokens") or []]
    if len(token_ids) != len(token_logprobs):
        raise ServerError(
            f"choice {choice.get('index')}: {len(token_ids)} token ids but {len(token_logprobs)} log-probs"
        )
    finish_reason = choice.get("finish_reason")
    if finish_reason not in ("stop", "length"):
        raise ServerError(f"choice {choice.get('index')} ended with finish_reason={finish_reason!r}")
    return Completion(
        list(token_ids), choice.get("text", ""), [float(x) for x in token_logprobs], finish_reason
    )


def _parse_token_id(token: str) -> int:
    prefix, _, number = token.partition(":")
    if prefix != "token_id" or not number.lstrip("-").isdigit():
        raise ServerError(
            f"the server returned token {token!r} without its id: it must support return_token_ids or "
            "return_tokens_as_token_ids (vLLM does)"
        )
    return int(number)
