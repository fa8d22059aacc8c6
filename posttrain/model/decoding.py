"""Batched greedy decoding over the latent cache, and MTP self-speculative decoding (report Sec. 5.4.3).

Speculative step (D = 1): the main model has cached t_0..t_{n-1} and chosen t_n; the MTP module drafts
d ~ t_{n+1}. One main step over [t_n, d] yields the greedy t_{n+1} and, if it equals d, t_{n+2} too. A rejected
draft is rolled back by shortening the row's cache by one slot. Every emitted token is the main model's greedy
choice, so the output equals plain greedy decoding; the MTP module only decides how many arrive per step.
"""

from __future__ import annotations

import torch

from posttrain.model.modeling import DeepseekV3ForCausalLM


def _right_padded(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, device=device)
    return ids, lengths


def _finish(outputs: list[list[int]], max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
    finished = []
    for tokens in outputs:
        tokens = tokens[:max_new_tokens]
        if eos_token_id is not None and eos_token_id in tokens:
            tokens = tokens[: tokens.index(eos_token_id) + 1]
        finished.append(tokens)
    return finished


def _done(tokens: list[int], max_new_tokens: int, eos_token_id: int | None) -> bool:
    return len(tokens) >= max_new_tokens or (eos_token_id is not None and eos_token_id in tokens)


@torch.no_grad()
def generate_greedy(
    model: DeepseekV3ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """New tokens (argmax each step) for every prompt, up to max_new_tokens or through eos_token_id."""
    ids, lengths = _right_padded(prompts, model.lm_head.weight.device)
    rows = torch.arange(len(prompts), device=ids.device)
    cache = model.new_cache(len(prompts), capacity=ids.shape[1] + max_new_tokens)
    logits, _ = model.decode_step(ids, cache, num_new=lengths)
    next_token = logits[rows, lengths - 1].argmax(-1)
    outputs: list[list[int]] = [[] for _ in prompts]
    while True:
        for row, token in enumerate(next_token.tolist()):
            if not _done(outputs[row], max_new_tokens, eos_token_id):
                outputs[row].append(token)
        if all(_done(out, max_new_tokens, eos_token_id) for out in outputs):
            return _finish(outputs, max_new_tokens, eos_token_id)
        logits, _ = model.decode_step(next_token[:, None], cache)
        next_token = logits[:, -1].argmax(-1)


@torch.no_grad()
def generate_speculative(
    model: DeepseekV3ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> tuple[list[list[int]], dict[str, float]]:
    """Greedy decoding with the first MTP module as the drafter. Returns the same tokens as `generate_greedy`
    and {"acceptance_rate", "drafted", "accepted", "main_steps"} (a verify step emits 1 + accepted tokens)."""
    if not len(model.model.mtp_layers):
        raise ValueError("speculative decoding needs MTP layers (num_nextn_predict_layers >= 1)")
    ids, lengths = _right_padded(prompts, model.lm_head.weight.device)
    batch, rows = len(prompts), torch.arange(len(prompts), device=ids.device)
    capacity = ids.shape[1] + max_new_tokens + 2
    cache, mtp_cache = model.new_cache(batch, capacity), model.new_cache(batch, capacity, mtp=True)

    logits, hidden = model.decode_step(ids, cache, num_new=lengths)
    pending = logits[rows, lengths - 1].argmax(-1)  # t_n: chosen, not yet in the cache
    # MTP prefill: pairs (h_i, t_{i+1}) for i < n, the last one drafting t_{n+1}.
    ahead = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    ahead[rows, lengths - 1] = pending
    mtp_logits, _ = model.mtp_decode_step(hidden, ahead, mtp_cache, num_new=lengths)
    draft = mtp_logits[rows, lengths - 1].argmax(-1)

    outputs: list[list[int]] = [[t] for t in pending.tolist()]
    drafted = accepted = steps = 0
    while not all(_done(out, max_new_tokens, eos_token_id) for out in outputs):
        active = [not _done(out, max_new_tokens, eos_token_id) for out in outputs]
        logits, hidden = model.decode_step(torch.stack([pending, draft], dim=1), cache, num_new=2)
        greedy = logits.argmax(-1)  # [:, 0] is t_{n+1}; [:, 1] is t_{n+2} if the draft was t_{n+1}
        accept = greedy[:, 0] == draft
        cache.lengths -= (~accept).long()  # roll back the rejected draft's slot
        steps += 1
        for row in range(batch):
            if active[row]:
                drafted += 1
                accepted += int(accept[row])
                outputs[row].extend(greedy[row, : 1 + int(accept[row])].tolist())
        # MTP pairs (h_n, t_{n+1}) and, after an acceptance, (h_{n+1}, t_{n+2}); the last one drafts next.
        mtp_logits, _ = model.mtp_decode_step(hidden, greedy, mtp_cache, num_new=1 + accept.long())
        draft = mtp_logits[rows, accept.long()].argmax(-1)
        pending = torch.where(accept, greedy[:, 1], greedy[:, 0])

    stats = {
        "acceptance_rate": accepted / max(drafted, 1),
        "drafted": float(drafted),
        "accepted": float(accepted),
        "main_steps": float(steps),
    }
    return _finish(outputs, max_new_tokens, eos_token_id), stats
