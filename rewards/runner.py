"""Scoring a batch with several weighted rewards, each call bounded in time, failures counted and logged.

The total of a sample is ``sum_j w_j * r_j`` over the rewards ``j`` that apply to it, with these rules:

* a reward that *returns* ``None`` for a sample does not apply to it (TRL's convention, e.g. a math reward on
  a code prompt) and is left out of that sample's sum;
* a reward that *failed* on a sample (raised, timed out, returned something that is not a number) makes the
  sample's total ``None``: a partial sum would silently score it as if the failed part were 0;
* a sample no reward applies to has total ``None``;
* rewards with weight 0 are only logged: their failures leave the total alone.

The trainer excludes ``None`` totals from its group statistics.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rewards.pool import BoundedPool, Call, Outcome, cpu_count, describe_exception
from rewards.registry import as_messages, get, is_batched, message_text


@dataclass(frozen=True)
class RewardSpec:
    """One reward of a recipe: its name (registered, entry point or import path), weight and keyword
    arguments; ``timeout_s`` overrides the runner's bound for this reward; ``in_process`` runs it once per
    batch in the caller's process, without a time bound, for rewards that hold a model (a local judge);
    ``completions_as`` is the shape the function reads: ``"text"`` (strings) or ``"messages"`` (TRL's
    conversational shape, ``[{"role": "assistant", "content": ...}]``, which TRL-style rewards index into)."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    in_process: bool = False
    completions_as: str = "text"


@dataclass(frozen=True)
class RewardFailure:
    reward: str
    sample: int
    message: str
    timed_out: bool


@dataclass
class RewardScores:
    """Per-reward scores, the weighted total per sample (rule in the module docstring), and what went wrong."""

    per_function: dict[str, list[float | None]]  # reward name -> one value per sample (None: n/a or failed)
    total: list[float | None]
    none_counts: dict[str, int]  # Nones per reward: samples it does not apply to, plus its failures
    error_counts: dict[str, int]  # failures other than timeouts (exceptions, bad return values, dead workers)
    timeout_counts: dict[str, int]  # calls killed at the deadline
    failures: list[RewardFailure]  # one per failed (reward, sample), with the exception text, for the log


class RewardRunner:
    """Scores batches with ``specs`` in a pool of ``workers`` warm processes.

    Each sample is its own call (so one hanging completion costs one score, not a batch), bounded by
    ``timeout_s`` seconds after which its worker is killed and replaced; batched rewards are one call per
    batch. Use as a context manager, or call ``close()``.

    Rewards are called by keyword, as TRL calls them: ``fn(prompts=..., completions=..., **columns, **kwargs)``.
    """

    def __init__(self, specs: Sequence[RewardSpec], workers: int | None = None, timeout_s: float = 10.0):
        names = [spec.name for spec in specs]
        if not specs:
            raise ValueError("RewardRunner needs at least one RewardSpec")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rewards listed twice: {duplicates}; list each reward once")
        for spec in specs:
            if spec.completions_as not in _COMPLETION_SHAPES:
                raise ValueError(
                    f"reward {spec.name!r}: completions_as={spec.completions_as!r}; choose from "
                    f"{sorted(_COMPLETION_SHAPES)}"
                )
        self.specs = list(specs)
        self.functions = [get(spec.name) for spec in specs]
        for spec, fn in zip(self.specs, self.functions, strict=True):
            if not spec.in_process:
                _check_sendable(spec, fn)
        self.timeout_s = timeout_s
        needs_pool = not all(spec.in_process for spec in specs)
        self.pool = BoundedPool(workers or cpu_count()) if needs_pool else None
        self._warmup_set = False

    def score(self, prompts: list, completions: list, columns: dict[str, list] | None = None) -> RewardScores:
        """Score every completion with every reward; ``columns`` are the dataset's extra columns (one value
        per completion), passed to the rewards as keyword lists, e.g. ``answer``, ``tests``,
        ``completion_ids``. Values must be picklable."""
        columns = dict(columns or {})
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")

        shaped = {  # each completion in the shape(s) the rewards read
            shape: [convert(c) for c in completions]
            for shape, convert in _COMPLETION_SHAPES.items()
            if any(spec.completions_as == shape for spec in self.specs)
        }
        in_process = {
            j: _split(_call_batch(fn, spec.kwargs, prompts, shaped[spec.completions_as], columns), n)
            for j, (spec, fn) in enumerate(zip(self.specs, self.functions, strict=True))
            if spec.in_process
        }
        calls, owners = self._pooled_calls(prompts, shaped, columns)
        if calls and not self._warmup_set:
            # Each new worker first calls every reward once on an empty completion (with the first sample's
            # prompt and columns), so that imports and lazy set-up run before its first deadline starts. An
            # empty completion gives a reward nothing to hang on.
            empty = {shape: [convert("")] for shape, convert in _COMPLETION_SHAPES.items()}
            first_row = {key: values[:1] for key, values in columns.items()}
            self.pool.set_warmup(self._pooled_calls(prompts[:1], empty, first_row)[0])
            self._warmup_set = True

        per_spec = {j: [Outcome()] * n for j in range(len(self.specs))} | in_process
        for (j, i), outcome in zip(owners, self.pool.map(calls) if calls else [], strict=True):
            if i is None:
                per_spec[j] = _split(outcome, n)
            else:
                per_spec[j][i] = outcome
        return self._collect(per_spec, n)

    def _pooled_calls(
        self, prompts: list, shaped: dict[str, list], columns: dict[str, list]
    ) -> tuple[list[Call], list[tuple[int, int | None]]]:
        """The pool's calls for a batch: one per sample, or one per batch for a batched reward; and for each
        call its owner, (spec index, sample index or None for the whole batch)."""
        calls: list[Call] = []
        owners: list[tuple[int, int | None]] = []
        for j, (spec, fn) in enumerate(zip(self.specs, self.functions, strict=True)):
            timeout_s = spec.timeout_s if spec.timeout_s is not None else self.timeout_s
            given = shaped[spec.completions_as]
            if spec.in_process:
                continue
            if is_batched(fn):
                calls.append(Call(_call_batch_checked, (fn, spec.kwargs, prompts, given, columns), timeout_s))
                owners.append((j, None))
                continue
            for i in range(len(prompts)):
                row = {key: values[i] for key, values in columns.items()}
                calls.append(Call(_call_one, (fn, spec.kwargs, prompts[i], given[i], row), timeout_s))
                owners.append((j, i))
        return calls, owners

    def _collect(self, per_spec: dict[int, list[Outcome]], n: int) -> RewardScores:
        scores = RewardScores({}, [0.0] * n, {}, {}, {}, [])
        applies = [False] * n
        for j, spec in enumerate(self.specs):
            outcomes = per_spec[j]
            values = [outcome.value if outcome.ok else None for outcome in outcomes]
            scores.per_function[spec.name] = values
            scores.none_counts[spec.name] = sum(value is None for value in values)
            scores.error_counts[spec.name] = sum(not o.ok and not o.timed_out for o in outcomes)
            scores.timeout_counts[spec.name] = sum(o.timed_out for o in outcomes)
            for i, outcome in enumerate(outcomes):
                if not outcome.ok:
                    scores.failures.append(
                        RewardFailure(spec.name, i, outcome.error or "", outcome.timed_out)
                    )
                    if spec.weight != 0:  # a zero-weight reward is only watched: its failure changes no total
                        scores.total[i] = None
                elif outcome.value is not None and scores.total[i] is not None:
                    scores.total[i] += spec.weight * outcome.value
                    applies[i] = True
        scores.total = [total if applies[i] else None for i, total in enumerate(scores.total)]
        return scores

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_COMPLETION_SHAPES = {"text": message_text, "messages": as_messages}


def _check_sendable(spec: RewardSpec, fn: Callable) -> None:
    try:
        pickle.dumps((fn, spec.kwargs))
    except Exception as exc:
        raise ValueError(
            f"reward {spec.name!r} cannot be sent to worker processes ({exc}): define it as a module-level "
            "function (not a lambda or closure), or set in_process=True for a reward that holds a model"
        ) from exc


def _validated(values: object, n: int) -> list[float | None]:
    """A reward's return value checked against the contract: a list of ``n`` numbers or ``None``s."""
    if not isinstance(values, list | tuple) or len(values) != n:
        got = (
            f"a {type(values).__name__} of length {len(values)}"
            if hasattr(values, "__len__")
            else repr(values)
        )
        raise TypeError(f"a reward must return a list of {n} floats or None, got {got}")
    checked: list[float | None] = []
    for value in values:
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, str) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
            raise TypeError(f"a reward must return floats or None, got {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"a reward returned {value!r}")
        checked.append(float(value))
    return checked


def _call_one(fn: Callable, kwargs: dict, prompt: Any, completion: Any, row: dict) -> float | None:
    columns = {key: [value] for key, value in row.items()}
    return _validated(fn(prompts=[prompt], completions=[completion], **columns, **kwargs), 1)[0]


def _call_batch_checked(fn: Callable, kwargs: dict, prompts: list, completions: list, columns: dict) -> list:
    return _validated(fn(prompts=prompts, completions=completions, **columns, **kwargs), len(completions))


def _call_batch(fn: Callable, kwargs: dict, prompts: list, completions: list, columns: dict) -> Outcome:
    """An in-process batch call: exceptions become a failed Outcome, as in a worker."""
    try:
        return Outcome(value=_call_batch_checked(fn, kwargs, prompts, completions, columns))
    except Exception as exc:  # noqa: BLE001 - a reward's failure is data, never the trainer's crash
        return Outcome(error=describe_exception(exc))


def _split(outcome: Outcome, n: int) -> list[Outcome]:
    """A whole-batch outcome as one outcome per sample."""
    if outcome.ok:
        return [Outcome(value=value) for value in outcome.value]
    return [outcome] * n
