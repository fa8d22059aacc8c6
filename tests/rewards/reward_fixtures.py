"""Module-level reward functions for the runner tests: worker processes import them by name."""

import os
import time

from rewards import register


def constant_half(prompts, completions, **columns):
    return [0.5] * len(completions)


def length_of_completion(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def hang_on_marker(prompts, completions, **columns):
    """Spins forever (pure Python: a signal-free hang) on completions containing HANG."""
    for completion in completions:
        while "HANG" in completion:
            pass
    return [1.0] * len(completions)


def sleep_on_marker(prompts, completions, **columns):
    """Sleeps in C (time.sleep) for completions containing SLEEP."""
    if any("SLEEP" in c for c in completions):
        time.sleep(3600)
    return [1.0] * len(completions)


def raise_on_marker(prompts, completions, **columns):
    if any("RAISE" in c for c in completions):
        raise ZeroDivisionError("the reward divided by zero")
    return [1.0] * len(completions)


def die_on_marker(prompts, completions, **columns):
    if any("DIE" in c for c in completions):
        os._exit(7)
    return [1.0] * len(completions)


def not_applicable_to_code(prompts, completions, kind, **columns):
    """None (does not apply) for code rows, like a math reward in a mixed dataset."""
    return [None if k == "code" else 1.0 for k in kind]


def wrong_length(prompts, completions, **columns):
    return [1.0] * (len(completions) + 1)


def returns_text(prompts, completions, **columns):
    return ["1.0"] * len(completions)


@register("fixture_group_rank", batched=True)
def group_rank(prompts, completions, **columns):
    """Batch-level: rank of the completion's length within the whole batch (needs every completion)."""
    order = sorted(range(len(completions)), key=lambda i: len(completions[i]))
    ranks = [0.0] * len(completions)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def worker_pid(prompts, completions, **columns):
    return [float(os.getpid())] * len(completions)


unpicklable = lambda prompts, completions, **columns: [1.0] * len(completions)  # noqa: E731
