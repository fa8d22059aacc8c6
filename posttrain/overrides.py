"""Command-line overrides of a recipe: `dotted.key=value`, with list items named by their index."""

from __future__ import annotations

from typing import Any

import yaml

from posttrain.errors import RecipeError


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML (so `3e-4`, `true`, `[1,2]` get their types).

    A number after a list's key names an item: `rewards.functions.0.weight=0.5`. An index must exist: to add
    or remove items, set the whole list (`rewards.functions=[{name: math_accuracy}, {name: think_format}]`).
    """
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise RecipeError("expected dotted.key=value", where=f"override {item}")
        parts = key.split(".")
        *parents, leaf = parts
        node: Any = raw
        for depth, part in enumerate(parents):
            node = _child(node, part, key, ".".join(parents[:depth]))
            if node == {} and parts[depth + 1].isdigit():
                path = ".".join(parents[: depth + 1])
                raise RecipeError(
                    f"{path} is not in the recipe, so it has no items to override; set the whole list: "
                    f"{path}=[...]",
                    where=f"override {key}",
                )
        if isinstance(node, list):
            node[_list_index(node, leaf, key, ".".join(parents))] = yaml.safe_load(value)
        elif isinstance(node, dict):
            node[leaf] = yaml.safe_load(value)
        else:
            raise RecipeError(f"{'.'.join(parents)} is a value, not a section", where=f"override {key}")
    return raw


def _child(node: Any, part: str, key: str, path: str) -> Any:
    """The section or list item `part` of `node` (a missing section is created empty)."""
    if isinstance(node, list):
        return node[_list_index(node, part, key, path)]
    if not isinstance(node, dict):
        raise RecipeError(f"{path} is a value, not a section", where=f"override {key}")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _list_index(items: list, part: str, key: str, path: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    indices = f"indices 0-{len(items) - 1}" if items else "no indices"
    raise RecipeError(
        f"list {path} has {len(items)} items ({indices}); to add or remove items set the whole list: "
        f"{path}=[...]",
        where=f"override {key}",
    )
