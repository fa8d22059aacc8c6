"""Rollouts with transformers' `generate`: KV cache, left-padded batches, for CPU and small runs.

Temperature and top-p are applied by our own logits processor rather than by transformers' warpers, because it
is the one place that sees the raw logits z_t of every step: it keeps log softmax(z_t / T) for the token
sampled next (the log-prob definition of `base.py`) and hands the sampler z_t / T with the nucleus masked out.
It holds one step of log-probs at a time, so memory does not grow with vocabulary × length.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from posttrain.generation.base import (
    Completion,
    SamplingParams,
    check_prompts,
    first_stop,
    tokens_through_stop,
)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set of most likely tokens whose mass reaches `top_p`."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens; the top token has 0
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class _ScaleAndRecordLogprobs(LogitsProcessor):
    """Return z/T (nucleus-masked) to the sampler and record log softmax(z/T) at the token it then picks."""

    def __init__(self, params: SamplingParams) -> None:
        self.temperature = params.logprob_temperature
        self.top_p = 1.0 if params.greedy else params.top_p
        self.step_logprobs: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None  # log-probs of the step whose token is not yet known

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        scaled = scores.float() / self.temperature
        self.pending = scaled.log_softmax(dim=-1)
        return top_p_mask(scaled, self.top_p)

    def _take(self, chosen: torch.Tensor) -> None:
        if self.pending is not None:
            self.step_logprobs.append(self.pending.gather(1, chosen[:, None]).squeeze(1))
            self.pending = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """Log-probs of every generated token, shape [rows, generated length]."""
        self._take(sequences[:, -1])
        return torch.stack(self.step_logprobs, dim=1)


class HFBackend:
    """Generate with a transformers causal LM; it may be the trainer's own module (then no copy is made)."""

    def __init__(
        self,
        model: PreTrainedModel | str | Path,
        tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        if isinstance(model, str | Path):
            tokenizer = tokenizer or model
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        if tokenizer is None:
            raise ValueError("HFBackend needs a tokenizer (or a model path to load one from)")
        if isinstance(tokenizer, str | Path):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = self._eos_token_ids()
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )

    def _eos_token_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        if configured is None:
            configured = self.tokenizer.eos_token_id
        if configured is None:
            raise ValueError("HFBackend: neither the model's generation_config nor the tokenizer defines EOS")
        return [configured] if isinstance(configured, int) else list(configured)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        check_prompts(prompt_ids)
        rows = [ids for ids in prompt_ids for _ in range(params.n)]
        batch_size = self.max_batch_size or len(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=self._cuda_devices()), torch.no_grad():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                completions = [
                    completion
                    for start in range(0, len(rows), batch_size)
                    for completion in self._generate_batch(rows[start : start + batch_size], params)
                ]
        finally:
            self.model.train(was_training)
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompt_ids))]

    def _cuda_devices(self) -> list[int]:
        device = next(self.model.parameters()).device
        return [device.index or 0] if device.type == "cuda" else []

    def _generate_batch(self, rows: list[list[int]], params: SamplingParams) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(len(ids) for ids in rows)
        input_ids = torch.tensor(
            [[self.pad_token_id] * (width - len(ids)) + ids for ids in rows], device=device
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=device
        )
        recorder = _ScaleAndRecordLogprobs(params)
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=not params.greedy,
            # Temperature and top-p live in `recorder`; transformers' own warpers are switched off.
            temperature=1.0,
            top_p=1.0,
            top_k=None if params.greedy else 0,  # 0 disables top-k; greedy must leave it unset
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            stop_strings=params.stop or None,
            return_dict_in_generate=True,
        )
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
            tokenizer=self.tokenizer,
        )
        generated = output.sequences[:, width:]
        logprobs = recorder.finish(output.sequences)
        return [
            self._completion(generated[i].tolist(), logprobs[i].tolist(), params) for i in range(len(rows))
        ]

    def _completion(self, tokens: list[int], logprobs: list[float], params: SamplingParams) -> Completion:
        """Cut one generated row at its first EOS or stop string (whichever ends first) and decode it."""
        length, finish_reason = len(tokens), "length"
        eos_at = next((i for i, token in enumerate(tokens) if token in self.eos_token_ids), None)
        if eos_at is not None:
            length, finish_reason = eos_at + 1, "stop"
        text = self._decode(tokens[: eos_at if eos_at is not None else length])  # EOS has no text, as in vLLM
        stop_at = first_stop(text, params.stop)
        if stop_at is not None:
            length = tokens_through_stop(tokens[:length], params.stop, self._decode)
            finish_reason = "stop"
            text = text[:stop_at]
        return Completion(tokens[:length], text, logprobs[:length], finish_reason)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Share the trainer's module when it is ours already; otherwise copy its weights in."""
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def close(self) -> None:
        """Nothing to release: the model belongs to whoever built it."""
