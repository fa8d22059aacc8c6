"""R1-style trace generation with rejection sampling (DeepSeek-V3 §5.1, "Reasoning Data").

For each batch of prompts, top to bottom:
  1. sample N completions per prompt from the teacher (any generation backend); a batch the backend fails on
     is retried prompt by prompt with exponential back-off, and a prompt that keeps failing is recorded in
     `failed/` with the reason;
  2. score every completion with the recipe's rewards; it is *verified* when its total reaches the threshold;
  3. run the readability filters on every completion and record each verdict;
  4. accept verified completions that pass every filter: all of them up to k per prompt, or the best one;
  5. commit the batch: accepted rows (SFT-ready, in both of the report's formats), one row per sample with its
     rewards and verdicts, and failures — then the ledger line that makes the batch done (ledger.py).
At the end, the summary and plots are computed from everything on disk (stats.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from posttrain.config import RecipeError, dump_recipe
from posttrain.data.prompts import PromptSet, load_prompts
from posttrain.generation.base import Backend, Completion, SamplingParams, SamplingRefused
from posttrain.generation.factory import build_backend, make_backend, sampling_params
from posttrain.model.gguf import resolve_model_path
from posttrain.policy import compute_dtype, load_causal_lm, load_tokenizer
from posttrain.rollouts import make_reward_runner, score
from posttrain.samples import (
    TRACES_NO_SIGNAL,
    NoSignalAlarm,
    SampleLog,
    unverified_fraction,
    write_samples_view,
)
from posttrain.traces import filters
from posttrain.traces.config import TracesRecipe
from posttrain.traces.ledger import TraceLedger
from posttrain.traces.stats import summarize, write_report

log = logging.getLogger(__name__)


def make_teacher_backend(recipe: TracesRecipe, tokenizer: PreTrainedTokenizerBase, out: Path) -> Backend:
    """vLLM loads a teacher checkpoint itself; an OpenAI-compatible server needs only the tokenizer (to cut
    stop strings as the other backends do); otherwise the backend generates with the teacher loaded here, under
    bf16 autocast on a GPU when model.dtype is auto (`compute_dtype`)."""
    cfg = recipe.generation
    if cfg.backend == "vllm" and recipe.model.path is not None:
        model_path = resolve_model_path(recipe.model.path)  # a .gguf teacher: its converted checkpoint
        return build_backend("vllm", model_path=model_path, seed=cfg.seed, **cfg.options)
    if cfg.backend == "openai":
        return build_backend("openai", **{"tokenizer": tokenizer, **cfg.options})
    # Where the trainers put a model: a teacher left on the CPU of a GPU machine decodes many times slower.
    teacher = load_causal_lm(recipe.model).to("cuda" if torch.cuda.is_available() else "cpu")
    return make_backend(cfg, teacher, tokenizer, out, compute_dtype(recipe.model))


def generate_with_retries(
    backend: Backend, prompt_ids: list[list[int]], params: SamplingParams, recipe: TracesRecipe
) -> list[list[Completion] | str]:
    """Each prompt's completions, or why it failed. The batch goes in one call; if that raises, every prompt
    is tried alone up to `run.max_attempts` times, waiting backoff_s · 2^attempt between tries (threads only
    for a remote server: a local engine is one device, and transformers' sampling RNG is process-global).
    A backend that refuses the sampling settings themselves (SamplingRefused) stops the run at once."""
    try:
        return list(backend.generate(prompt_ids, params))
    except SamplingRefused:
        raise  # the sampling settings themselves: every prompt would be refused the same way
    except Exception as exc:  # noqa: BLE001 - any backend error; each prompt gets its own tries next
        log.warning("batch of %d prompts failed (%s); retrying prompt by prompt", len(prompt_ids), exc)

    def one(index: int) -> list[Completion] | str:
        reason = ""
        for attempt in range(recipe.run.max_attempts):
            try:
                return backend.generate([prompt_ids[index]], params)[0]
            except Exception as exc:  # noqa: BLE001
                reason = f"{type(exc).__name__}: {exc}"[:1000]
                if attempt + 1 < recipe.run.max_attempts:
                    time.sleep(recipe.run.backoff_s * 2**attempt)
        return f"failed after {recipe.run.max_attempts} attempts: {reason}"

    workers = recipe.run.concurrency if recipe.generation.backend == "openai" else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(prompt_ids))))


def sample_verdicts(
    sample: dict[str, Any], prompt_text: str, shortest_correct_think: int | None, recipe: TracesRecipe
) -> dict[str, str | None]:
    """Every enabled filter's verdict on one sample: None (pass) or the reason it rejects it."""
    cfg = recipe.filters
    verdicts: dict[str, str | None] = {}
    if cfg.max_tokens is not None or sample["finish_reason"] == "length":
        verdicts["max_length"] = filters.max_length(
            sample["num_tokens"], cfg.max_tokens or math.inf, sample["finish_reason"]
        )
    if cfg.require_format:
        verdicts["format"] = filters.required_format(sample["response"], cfg.think_opened_by_prompt)
    if cfg.language_consistency is not None:
        verdicts["language"] = filters.language_consistency(
            prompt_text, sample["response"], cfg.language_consistency
        )
    if cfg.max_repeated_ngram_fraction is not None:
        verdicts["repetition"] = filters.repetition(
            sample["token_ids"], cfg.repetition_ngram, cfg.max_repeated_ngram_fraction
        )
    if cfg.max_think_tokens is not None or cfg.max_think_ratio is not None:
        verdicts["overthinking"] = filters.overthinking(
            sample["think_tokens"], cfg.max_think_tokens, shortest_correct_think, cfg.max_think_ratio
        )
    return verdicts


def choose_accepted(samples: list[dict[str, Any]], rule: str, k: int) -> list[int]:
    """Indices of the accepted samples among verified ones that passed every filter.

    all_correct: the first k in sampling order (no preference for any trait the filters did not ask for);
    best_of_n: the one with the highest total reward, the shorter one on ties.
    """
    candidates = [
        i for i, s in enumerate(samples) if s["verified"] and all(v is None for v in s["filters"].values())
    ]
    if rule == "best_of_n":
        return sorted(candidates, key=lambda i: (-samples[i]["reward_total"], samples[i]["num_tokens"]))[:1]
    return candidates[:k]


def _problem(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [m for m in messages if m["role"] != "system"]


def training_rows(
    messages: list[dict[str, str]], response: str, recipe: TracesRecipe
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The report's two SFT formats: <system prompt, problem, R1 response> and <problem, original response>.

    The R1 row's system prompt is `output.r1_system_prompt` (the prompt's own one when that is null); the
    original row has no system prompt and, by default, only the answer after `</think>` as its response.
    """
    problem = _problem(messages)
    system = recipe.output.r1_system_prompt
    if system is None:
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
    r1 = ([{"role": "system", "content": system}] if system else []) + problem
    r1 = [*r1, {"role": "assistant", "content": response}]
    original = response
    if recipe.output.original_response == "answer":
        reasoning, answer = filters.split_think(response, recipe.filters.think_opened_by_prompt)
        original = answer.strip() if reasoning else response
    return r1, [*problem, {"role": "assistant", "content": original}]


def process_batch(
    prompts: PromptSet,
    indices: list[int],
    outputs: list[list[Completion] | str],
    runner: Any,
    tokenizer: PreTrainedTokenizerBase,
    params: SamplingParams,
    recipe: TracesRecipe,
) -> dict[str, list[dict[str, Any]]]:
    """Score, filter and accept one batch; returns the rows of each stream."""
    rows: dict[str, list[dict[str, Any]]] = {"accepted": [], "samples": [], "failed": []}
    generated = [(i, out) for i, out in zip(indices, outputs, strict=True) if not isinstance(out, str)]
    for index, out in zip(indices, outputs, strict=True):
        if isinstance(out, str):
            rows["failed"].append({"prompt_index": index, "source": prompts.sources[index], "reason": out})
    if not generated:
        return rows
    expanded = prompts.select([i for i, out in generated for _ in out])
    completions = [c for _, out in generated for c in out]
    expanded.columns["completion_ids"] = [c.token_ids for c in completions]
    totals, per_function, _ = score(runner, expanded, completions)
    teacher = recipe.teacher_name or recipe.model.path or recipe.model.from_config
    sampling = {"backend": recipe.generation.backend, **dataclasses.asdict(params)}
    flat = 0
    for index, out in generated:
        messages = prompts.messages[index]
        prompt_text = "\n".join(m["content"] for m in _problem(messages))
        samples = []
        for sample_index, completion in enumerate(out):
            total = float(totals[flat])
            reasoning, _ = filters.split_think(completion.text, recipe.filters.think_opened_by_prompt)
            samples.append(
                {
                    "prompt_index": index,
                    "sample_index": sample_index,
                    "source": prompts.sources[index],
                    "response": completion.text,
                    "token_ids": completion.token_ids,
                    "num_tokens": len(completion.token_ids),
                    "think_tokens": len(tokenizer(reasoning, add_special_tokens=False)["input_ids"]),
                    "finish_reason": completion.finish_reason,
                    "rewards": {name: values[flat] for name, values in per_function.items()},
                    "reward_total": None if math.isnan(total) else total,
                    "verified": not math.isnan(total) and total >= recipe.accept.threshold,
                }
            )
            flat += 1
        verified_thinks = [s["think_tokens"] for s in samples if s["verified"] and s["think_tokens"]]
        shortest = min(verified_thinks) if verified_thinks else None
        for sample in samples:
            sample["filters"] = sample_verdicts(sample, prompt_text, shortest, recipe)
        accepted = set(choose_accepted(samples, recipe.accept.rule, recipe.accept.max_per_prompt))
        for sample_index, sample in enumerate(samples):
            sample["accepted"] = sample_index in accepted
            del sample["token_ids"]
            rows["samples"].append(sample)
            if sample["accepted"]:
                r1, original = training_rows(messages, sample["response"], recipe)
                rows["accepted"].append(
                    {
                        "id": f"{index}-{sample_index}",
                        "messages": r1,
                        "messages_original": original,
                        "source": sample["source"],
                        "prompt_index": index,
                        "sample_index": sample_index,
                        "teacher": teacher,
                        "sampling": sampling,
                        "rewards": sample["rewards"],
                        "reward_total": sample["reward_total"],
                        "filters_passed": sorted(sample["filters"]),
                        "num_tokens": sample["num_tokens"],
                    }
                )
    return rows


def _fingerprint(recipe: TracesRecipe) -> dict[str, Any]:
    """What must not change between a run and its resumption (output would mix two recipes otherwise)."""
    fields = recipe.model_dump(mode="json", exclude={"output_dir", "run", "logging"})
    return {**fields, "batch_prompts": recipe.run.batch_prompts}


def _check_resumable(out: Path, recipe: TracesRecipe, resume: bool) -> None:
    path = out / "traces_fingerprint.json"
    current = _fingerprint(recipe)
    if resume and path.exists():
        before = json.loads(path.read_text())
        changed = sorted(key for key in current.keys() | before.keys() if current.get(key) != before.get(key))
        if changed:
            raise RecipeError(
                f"cannot resume with a different recipe (changed: {', '.join(changed)}); use another "
                "output_dir, or --overwrite to start afresh",
                file=str(out),
            )
    path.write_text(json.dumps(current, indent=2))


def run_traces(recipe: TracesRecipe, resume: bool = False, backend: Backend | None = None) -> Path:
    """Generate, verify, filter and write traces; returns the output directory (accepted/ holds the SFT rows).

    `backend` replaces the recipe's teacher (tests script one); it is not closed here.
    """
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ledger = TraceLedger(out, recipe.output.shard_rows)
    ledger.open(resume)
    _check_resumable(out, recipe, resume)
    dump_recipe(recipe, out / "recipe.yaml")

    tokenizer = load_tokenizer(recipe.model)
    data = recipe.data
    prompts = load_prompts(
        data.train, tokenizer, data.prompt_field, data.system_prompt, data.max_prompt_tokens
    )
    count = min(len(prompts), recipe.run.max_prompts or len(prompts))
    size = recipe.run.batch_prompts
    batches = [list(range(start, min(start + size, count))) for start in range(0, count, size)]
    todo = [b for b in range(len(batches)) if b not in ledger.done]
    log.info(
        "%d prompts in %d batches; %d batches already done", count, len(batches), len(batches) - len(todo)
    )

    teacher = backend or (make_teacher_backend(recipe, tokenizer, out) if todo else None)
    runner = make_reward_runner(recipe.rewards)
    sample_log = SampleLog(out, recipe.logging.samples, recipe.accept.num_samples, None if resume else 0)
    no_signal = NoSignalAlarm(TRACES_NO_SIGNAL)
    bar = tqdm(total=len(batches), initial=len(batches) - len(todo), unit="batch")
    try:
        for batch in todo:
            indices = batches[batch]
            params = sampling_params(
                recipe.generation, recipe.accept.num_samples, recipe.generation.seed + 1009 * batch
            )
            outputs = generate_with_retries(teacher, [prompts.prompt_ids[i] for i in indices], params, recipe)
            rows = process_batch(prompts, indices, outputs, runner, tokenizer, params, recipe)
            ledger.commit(batch, indices, rows)
            sample_log.write_trace_batch(batch + 1, rows["samples"], prompts.messages)
            no_signal.update(unverified_fraction(rows["samples"]))
            accepted, total = ledger.state["accepted"]["rows"], ledger.state["samples"]["rows"]
            bar.update(1)
            bar.set_postfix({"accepted": f"{accepted}/{total}"}, refresh=False)
    finally:
        bar.close()
        runner.close()
        if teacher is not None and backend is None:
            teacher.close()

    summary, lengths = summarize(ledger.read("samples"), ledger.read("failed"), recipe.accept.pass_at_k)
    summary["accepted_files"] = [str(p) for p in ledger.parts("accepted")]
    write_report(summary, lengths, out)
    write_samples_view(out, f"Traces — {recipe.output_dir}")
    log.info(
        "accepted %d of %d samples (%.1f%%); %d prompts failed; report in %s",
        summary["accepted"],
        summary["samples"],
        100 * summary["acceptance_rate"],
        summary["failed_prompts"],
        out,
    )
    return out
