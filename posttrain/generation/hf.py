"""Rollouts from a transformers causal LM with our own decoding loop over transformers' KV caches.

For CPU and small runs. transformers' `generate` spends much of a small model's decoding time outside the model
(logits processors, stopping criteria, input preparation), prefills every one of the n copies of a prompt,
grows its cache by concatenation (a copy of the whole cache per layer and token) and, in its "sdpa" attention,
copies grouped K/V heads H/H_kv times whenever there is a padding mask. Here:

1. each distinct prompt is prefilled once, in one left-padded batch (attention mask, position ids counting real
   tokens only), computing the logits of its last position only;
2. its keys and values are copied once per completion into a `StaticCache` sized for the whole decode, which
   each step then writes in place;
3. one forward per token for the whole batch; once a quarter of the batch has finished (EOS, stop string), the
   finished rows leave the batch and the cache;
4. sampling and log-probs follow `posttrain.generation.base`: log softmax(z/T) before top-p, T = 1 for greedy.

On CUDA a small model's decoding is bound by kernel launches and Python, not by the GPU (SmolLM2-135M: ~1 ms per
layer per token). There each token's forward runs with inputs of fixed shape and address (`StaticDecodeStep`: a
[B, 1, 1, capacity] mask whose next column is opened in place, position ids advanced in place, the static cache
writing where its own length counter says), captured once per batch as a CUDA graph and replayed per token; the
batch then keeps its finished rows (a replay costs the same either way, and a new capture costs more than the
rows it would drop). `decode="static"` runs the same fixed-shape inputs without capture on CPU, which is how the
tests check them against the growing-mask loop.

The forwards run with `GROUPED_KV_SDPA`: transformers' SDPA contract, with grouped K/V heads under a padding mask
not copied once per query head (see its docstring), the same attention without the copies. The attention
implementation is switched for the duration of a call and restored afterwards, because the module is usually the
trainer's own; posttrain's packed-row attention (`posttrain_varlen`), which takes no padding mask, is replaced by
SDPA while decoding for the same reason.

With `autocast` (a trainer passes its mixed precision, bf16), every forward runs under torch.autocast as the
trainer's own scoring forward does, so the sampler's log-probs follow the trainer's arithmetic, and an fp32
master model decodes at the autocast dtype's speed: its weights are cast once per call (autocast caches the casts
of leaf parameters), and the cache holds keys and values in the autocast dtype (`CastingStaticCache`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StaticCache,
)
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from posttrain.fast.attention import VARLEN_ATTENTION, grouped_query_attention
from posttrain.generation.base import (
    Completion,
    SamplingParams,
    check_prompts,
    first_stop,
    tokens_through_stop,
)

GROUPED_KV_SDPA = "posttrain_grouped_kv_sdpa"


def grouped_kv_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' "sdpa" attention, except that grouped K/V heads (q [B, H, S, D], k/v [B, H_kv, L, D]) under
    a padding mask are not copied H/H_kv times first (transformers copies them for the sake of CUDA kernels):

    - decoding (S = 1): `grouped_query_attention`, the G = H/H_kv query heads that share a K/V head as G queries
      of that head, reading the cache once (copying it G times cost SmolLM2's decoding on an H200 half its GPU
      time);
    - a prefill on CPU: the grouped heads as they are, through `enable_gqa` (on CPU the copy costs more than the
      attention); on CUDA, transformers' own function.

    Every other case is transformers' own function."""
    extras = kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None
    grouped = attention_mask is not None and key.shape[1] != query.shape[1] and not extras
    if grouped and query.shape[2] == 1:
        # Under autocast the query leaves RoPE in fp32 while the cache stores the autocast dtype; SDPA under
        # autocast would cast the query to it as well.
        out = grouped_query_attention(query.to(key.dtype), key, value, attention_mask, scaling, dropout)
        return out.transpose(1, 2).contiguous(), None
    if grouped and not query.is_cuda:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


AttentionInterface.register(GROUPED_KV_SDPA, grouped_kv_sdpa)
AttentionMaskInterface.register(GROUPED_KV_SDPA, sdpa_mask)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set of most likely tokens whose mass reaches `top_p`."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens; the top token has 0
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_next(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row of `logits` [B, V] and its log-prob, log softmax(z/T)[y] (base.py): argmax
    for greedy decoding (T = 1), else a draw from softmax(z/T) restricted to the top-p nucleus."""
    scaled = logits.float() / params.logprob_temperature
    logprobs = scaled.log_softmax(dim=-1)
    if params.greedy:
        chosen = scaled.argmax(dim=-1)
    else:
        chosen = torch.multinomial(top_p_mask(scaled, params.top_p).softmax(dim=-1), 1).squeeze(-1)
    return chosen, logprobs.gather(-1, chosen[:, None]).squeeze(-1)


class CastingStaticCache(StaticCache):
    """A StaticCache that stores keys and values in `storage_dtype`. Under autocast, transformers' RoPE returns
    fp32 keys (the residual stream's dtype) which SDPA casts to the autocast dtype at every read; casting once, as
    they are written, gives SDPA the same operands and halves the cache."""

    def __init__(self, storage_dtype: torch.dtype, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage_dtype = storage_dtype

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(
            key_states.to(self.storage_dtype), value_states.to(self.storage_dtype), layer_idx, *args, **kwargs
        )


class StaticDecodeStep:
    """One decoding forward over inputs of fixed shape and address, as a CUDA graph on CUDA.

    Row i's mask allows its prompt (`mask`, left-padded to `width`) and every position decoded so far; each call
    feeds one token per row, opens the next cache column, runs the forward (a graph replay once captured) and
    advances the position ids. The static cache writes each step at its own length counter, a device tensor that
    the forward advances in place, so a replay writes where the eager forward would.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cache: StaticCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        capacity: int,
        capture: bool,
    ) -> None:
        rows, width = mask.shape
        self.model, self.cache, self.column = model, cache, width
        self.allowed = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=mask.device)
        self.allowed[:, 0, 0, :width] = mask.bool()
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long, device=mask.device)
        self.position_ids = positions.clone()
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            self._capture()

    def _forward(self) -> torch.Tensor:
        output = self.model(
            input_ids=self.input_ids,
            attention_mask=self.allowed,
            position_ids=self.position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        return output.logits[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream (lazy kernel and cuBLAS set-up must not happen during capture), undo the
        warm-up's advance of the cache's length counters (its write is overwritten by the first replay), then
        record the forward."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                self._forward()
        finally:  # also when the warm-up fails part-way: the cache must be as the dynamic loop expects it
            torch.cuda.current_stream().wait_stream(side)
            for layer, length in zip(self.cache.layers, lengths, strict=True):
                layer.cumulative_length.copy_(length)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """The next logits [B, V] after feeding `tokens` [B] (a view overwritten by the next call)."""
        self.input_ids.copy_(tokens[:, None])
        self.allowed[:, :, :, self.column] = True
        self.column += 1
        if self.graph is None:
            logits = self._forward()
        else:
            self.graph.replay()
            logits = self.logits
        self.position_ids += 1
        return logits


class HFBackend:
    """Generate with a transformers causal LM; it may be the trainer's own module (then no copy is made).

    `decode`: "dynamic" is the growing-mask loop whose batch sheds finished rows, "static" runs every token's
    forward on fixed-shape inputs (`StaticDecodeStep`, a CUDA graph on CUDA), "auto" is static on CUDA and dynamic
    on CPU. Static decoding needs SDPA attention (the model's "sdpa" or posttrain's varlen attention, both decoded
    with SDPA); "auto" decodes other implementations dynamically.

    `autocast` ("bfloat16", "float16" or a torch dtype; None: the weights' own precision) runs every forward
    under torch.autocast in that dtype, with the KV cache in it (see the module docstring).

    `max_batch_size` bounds the completions decoded together (prompts × n). With `SamplingParams.seed`, a call
    draws from its own copy of torch's RNG seeded with it: the same seed, prompts, parameters, weights and
    `max_batch_size` give the same completions on the same machine and thread count (float reductions may
    differ elsewhere). Without a seed, the draws come from, and advance, torch's global RNG.
    """

    def __init__(
        self,
        model: PreTrainedModel | str | Path,
        tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
        max_batch_size: int | None = None,
        decode: Literal["auto", "dynamic", "static"] = "auto",
        autocast: torch.dtype | str | None = None,
    ) -> None:
        if isinstance(model, str | Path):
            tokenizer = tokenizer or model
            model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        if tokenizer is None:
            raise ValueError("HFBackend needs a tokenizer (or a model path to load one from)")
        if isinstance(tokenizer, str | Path):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"HFBackend: max_batch_size must be >= 1, got {max_batch_size}")
        if decode not in ("auto", "dynamic", "static"):
            raise ValueError(f"HFBackend: decode must be 'auto', 'dynamic' or 'static', got {decode!r}")
        if isinstance(autocast, str):
            if autocast not in ("bfloat16", "float16"):
                raise ValueError(
                    f"HFBackend: autocast must be 'bfloat16', 'float16' or None, got {autocast!r}"
                )
            autocast = getattr(torch, autocast)
        self.decode = decode
        self.autocast = autocast
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
        seeded = params.seed is not None
        device_type = next(self.model.parameters()).device.type
        precision = torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None)
        try:
            with (
                torch.random.fork_rng(devices=self._cuda_devices(), enabled=seeded),
                torch.no_grad(),
                precision,
            ):
                if seeded:
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
        """Decode `rows` (prompts, repeated once per completion) together; see the module docstring."""
        device = next(self.model.parameters()).device
        distinct = list(dict.fromkeys(tuple(ids) for ids in rows))
        slot = {ids: i for i, ids in enumerate(distinct)}
        copies = torch.tensor([slot[tuple(ids)] for ids in rows], device=device)
        eos = torch.tensor(self.eos_token_ids, device=device)
        tokens = torch.zeros(len(rows), params.max_tokens, dtype=torch.long, device=device)
        logprobs = torch.zeros(len(rows), params.max_tokens, device=device)
        lengths = torch.full((len(rows),), params.max_tokens, device=device)
        running = torch.arange(len(rows), device=device)  # the row of `rows` each batch row decodes

        with self._decoding_attention():
            logits, prompt_cache, mask = self._prefill([list(ids) for ids in distinct], device)
            capacity = mask.shape[1] + params.max_tokens
            cache = self._static_cache(prompt_cache, copies, mask.shape[1], capacity)
            logits, mask = logits[copies], mask[copies]
            positions = mask.sum(dim=-1, keepdim=True)  # a row's next position: its prompt's length
            static = (
                self._static_step(cache, mask, positions, capacity) if self._static_decoding(device) else None
            )
            finished = torch.zeros(len(rows), dtype=torch.bool, device=device)  # ended, still in the batch
            for step in range(params.max_tokens):
                chosen, chosen_logprobs = sample_next(logits, params)
                tokens[running, step] = chosen  # past a row's end, `lengths` cuts these off
                logprobs[running, step] = chosen_logprobs
                ended = torch.isin(chosen, eos)
                if params.stop:
                    ended |= self._completed_stop(tokens[running, : step + 1], params.stop)
                ended &= ~finished
                lengths[running[ended]] = step + 1
                finished |= ended
                if step + 1 == params.max_tokens or bool(finished.all()):
                    break
                if static is not None:
                    logits = static(chosen)
                    continue
                # Rebuilding the cache without the finished rows costs about two decoding steps; doing it once a
                # quarter of the batch has finished was fastest (bench: 5.8 s against 6.1 s at every finish and
                # 8.1 s never, 64 completions of 3 to 256 tokens).
                if 4 * int(finished.sum()) >= len(finished):
                    keep = (~finished).nonzero().squeeze(-1)
                    cache = self._static_cache(cache, keep, mask.shape[1], capacity)
                    batch = (running, chosen, mask, positions, finished)
                    running, chosen, mask, positions, finished = (x[keep] for x in batch)
                mask = torch.cat([mask, mask.new_ones(len(running), 1)], dim=-1)
                output = self.model(
                    input_ids=chosen[:, None],
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
                logits, positions = output.logits[:, -1], positions + 1

        tokens, logprobs, lengths = tokens.tolist(), logprobs.tolist(), lengths.tolist()
        return [
            self._completion(t[:n], lp[:n], params)
            for t, lp, n in zip(tokens, logprobs, lengths, strict=True)
        ]

    def _prefill(
        self, prompts: list[list[int]], device: torch.device
    ) -> tuple[torch.Tensor, Cache, torch.Tensor]:
        """One forward over the left-padded prompts: last-position logits [P, V], the KV cache, the mask."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.tensor(
            [[self.pad_token_id] * (width - len(ids)) + ids for ids in prompts], device=device
        )
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # what an unpadded forward would use
        output = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        return output.logits[:, -1], output.past_key_values, mask

    def _static_cache(self, source: Cache, rows: torch.Tensor, length: int, capacity: int) -> StaticCache:
        """A cache of `capacity` preallocated positions holding positions [0, length) of `source`'s `rows`.

        Decoding writes each new position in place; transformers' default cache appends by concatenation, a
        copy of the whole cache per layer and token (the static cache measured 2-5% faster at 64 rows)."""
        if self.autocast is None:
            cache = StaticCache(config=self.model.config, max_cache_len=capacity)
        else:
            cache = CastingStaticCache(self.autocast, config=self.model.config, max_cache_len=capacity)
        for index, layer in enumerate(source.layers):
            cache.update(layer.keys[rows, :, :length], layer.values[rows, :, :length], index)
        return cache

    def _completed_stop(self, generated: torch.Tensor, stop: list[str]) -> torch.Tensor:
        """Which rows of `generated` [B, t] contain a stop string, found as their newest token completes it.

        Only the text of the last few tokens is decoded (a stop string starts at most its UTF-8 length, plus a
        partly decoded character, tokens back); a hit there is confirmed on the whole text, since a cut token
        sequence may decode differently at its start. A stop string this misses is still cut by `_completion`.
        """
        window = max(len(s.encode()) for s in stop) + 4
        hits = [
            first_stop(self._decode(row[-window:]), stop) is not None
            and first_stop(self._decode(row), stop) is not None
            for row in generated.tolist()
        ]
        return torch.tensor(hits, device=generated.device)

    def _static_decoding(self, device: torch.device) -> bool:
        """Whether this batch decodes with `StaticDecodeStep` (called inside `_decoding_attention`)."""
        if self.decode == "dynamic" or (self.decode == "auto" and device.type != "cuda"):
            return False
        attention = getattr(self.model.config, "_attn_implementation", None)
        if attention in ("sdpa", GROUPED_KV_SDPA):
            return True
        if self.decode == "static":
            raise ValueError(
                f"HFBackend: decode='static' needs SDPA attention; the model attends with {attention!r}"
            )
        return False

    def _static_step(
        self, cache: StaticCache, mask: torch.Tensor, positions: torch.Tensor, capacity: int
    ) -> StaticDecodeStep | None:
        """The batch's `StaticDecodeStep`, captured on CUDA. With decode="auto", a model with sliding-window
        layers (their cache is shorter than the mask) decodes dynamically, and a model whose forward cannot be
        captured (a host sync inside it, say) is decoded dynamically from then on, with a warning."""
        if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            if self.decode == "static":
                raise ValueError(
                    "HFBackend: decode='static' does not support sliding-window attention layers"
                )
            return None
        try:
            return StaticDecodeStep(self.model, cache, mask, positions, capacity, capture=mask.is_cuda)
        except RuntimeError as error:
            if self.decode == "static":
                raise
            warnings.warn(
                f"HFBackend: the decoding forward could not be captured as a CUDA graph ({error}); "
                "decoding with the growing-mask loop instead",
                stacklevel=2,
            )
            self.decode = "dynamic"
            return None

    @contextlib.contextmanager
    def _decoding_attention(self) -> Iterator[None]:
        """Decode with `GROUPED_KV_SDPA` instead of "sdpa" or packed-row attention."""
        config = getattr(self.model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        wanted = GROUPED_KV_SDPA
        if current not in ("sdpa", VARLEN_ATTENTION) or current == wanted:
            yield
            return
        self.model.set_attn_implementation(wanted)
        try:
            yield
        finally:
            self.model.set_attn_implementation(current)

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
