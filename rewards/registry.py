"""Finding reward functions by name: a decorator, the ``posttrain.rewards`` entry-point group, dotted paths.

A reward function has TRL's shape, and is called as TRL calls it, by keyword, so functions move between
toolkits unchanged::

    fn(prompts=prompts, completions=completions, **columns) -> list[float | None]

``prompts`` and ``completions`` are strings or chat message lists; every extra dataset column arrives as a
keyword list of the same length. ``None`` means "this reward does not apply to this sample".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

RewardFn = Callable[..., list[float | None]]
F = TypeVar("F", bound=Callable[..., Any])

ENTRY_POINT_GROUP = "posttrain.rewards"
_REGISTRY: dict[str, RewardFn] = {}


def register(name: str, *, batched: bool = False) -> Callable[[F], F]:
    """Decorator: make ``fn`` available to recipes as ``name``.

    ``batched=True`` marks a reward that needs the whole batch at once (e.g. one comparing the completions of
    a prompt with each other); the runner then calls it once per batch instead of once per sample.
    """

    def decorate(fn: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward name {name!r} is already registered to {_REGISTRY[name]!r}")
        if batched:
            fn.reward_batched = True  # type: ignore[attr-defined]
        _REGISTRY[name] = fn
        return fn

    return decorate


def is_batched(fn: Callable[..., Any]) -> bool:
    return getattr(fn, "reward_batched", False)


def get(name_or_path: str) -> RewardFn:
    """The reward registered as ``name_or_path``, else the entry point of that name, else an import path.

    Import paths are ``my_pkg.mod:fn`` or ``my_pkg.mod.fn``.
    """
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    for entry_point in entry_points(group=ENTRY_POINT_GROUP, name=name_or_path):
        return entry_point.load()
    if ":" in name_or_path or "." in name_or_path:
        return _import_path(name_or_path)
    raise KeyError(
        f"unknown reward {name_or_path!r}: not registered, not an entry point in {ENTRY_POINT_GROUP!r}, and "
        f"not an import path like 'my_pkg.module:function'. Available: {', '.join(available())}"
    )


def available() -> list[str]:
    """Names of the registered rewards and of the installed entry points."""
    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _import_path(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KeyError(f"reward {path!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise KeyError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise KeyError(f"reward {path!r} is a {type(fn).__name__}, not a function")
    return fn


def message_text(item: str | list[dict], role: str = "assistant") -> str:
    """The text of a prompt or completion: the string itself, or the last ``role`` message's content.

    TRL passes conversational completions as ``[{"role": "assistant", "content": ...}]``; content may also be a
    list of parts (``{"type": "text", "text": ...}``), whose text parts are joined.
    """
    if isinstance(item, str):
        return item
    if not isinstance(item, list):
        raise TypeError(f"expected a string or a list of chat messages, got {type(item).__name__}")
    for message in reversed(item):
        if message.get("role", role) == role:  # a message without a role (TRL's examples) is taken as asked
            content = message.get("content") or ""
            if isinstance(content, list):
                return "".join(part.get("text", "") for part in content if part.get("type") == "text")
            return content
    return ""


def as_messages(item: str | list[dict]) -> list[dict]:
    """A completion in TRL's conversational shape, ``[{"role": "assistant", "content": text}]``; a message list
    is returned as it is."""
    if isinstance(item, str):
        return [{"role": "assistant", "content": item}]
    if not isinstance(item, list):
        raise TypeError(f"expected a string or a list of chat messages, got {type(item).__name__}")
    return item
