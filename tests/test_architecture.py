"""The house rules of docs/ARCHITECTURE.md, read from the code with `ast`:

- the packages point one way: posttrain -> rewards -> sandbox (rewards never imports posttrain; sandbox imports
  neither);
- posttrain's rooms point one way: a module imports its own room or a room of a lower tier (TIERS), never one
  of its own tier or above;
- no modules of the three packages import each other in a circle.

Every import counts, at module level or inside a function; only imports under `if TYPE_CHECKING:` are left
out, because they never run (type hints may name a higher room's types).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("posttrain", "sandbox", "rewards")  # lowest last: each may import only the ones after it
FORBIDDEN_PACKAGES = {"posttrain": set(), "rewards": {"posttrain"}, "sandbox": {"posttrain", "rewards"}}

# posttrain's rooms (the first name under posttrain/), lowest tier first.
TIERS: list[tuple[str, ...]] = [
    ("__init__", "algorithms", "errors", "metrics", "samples"),  # the version; pure losses; user errors; logs
    ("overrides", "package_files"),  # command-line `dotted.key=value` overrides; `pkg:` file paths
    ("config", "fast", "report"),  # recipe schema (checks grpo.loss keys); fused kernels; end-of-run figure
    ("data", "model"),  # loading, templating, packing; posttrain's DeepSeek-V3
    ("generation",),  # rollout backends and their factory
    ("policy", "rollouts"),  # the trainers' forward; sampling + scoring with the reward functions
    ("trainers",),  # SFT, GRPO, distillation
    ("traces", "evals", "quickstart"),  # trace generation; RewardBench; the bundled SFT -> GRPO job
    ("cli",),  # `posttrain ...`: parses, loads one recipe, calls one entry function
    ("__main__",),
]
RANK = {room: tier for tier, rooms in enumerate(TIERS) for room in rooms}


# --------------------------------------------------------------------------------------------- the checker


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, skipping the bodies of `if TYPE_CHECKING:`."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        return [node]
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children = node.orelse
    else:
        children = list(ast.iter_child_nodes(node))
    return [found for child in children for found in _import_nodes(child)]


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of PACKAGES that `module` imports. `from a import b` names module a.b when that exists,
    else a; relative imports are resolved against `module`'s package."""
    targets = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = ".".join(package[: len(package) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        targets.update(name for name in names if name.split(".")[0] in PACKAGES)
    return targets


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: (source, is_package)} -> {module: the modules of PACKAGES it imports}."""
    known = set(sources)
    return {name: imports_of(name, text, package, known) for name, (text, package) in sources.items()}


def read_tree(root: Path) -> dict[str, tuple[str, bool]]:
    return {
        module_name(path, root): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
    }


def room(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def unknown_rooms(graph: dict[str, set[str]]) -> list[str]:
    return sorted({room(m) for m in graph if m.startswith("posttrain") and room(m) not in RANK})


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """posttrain imports that reach a room of the importer's tier or above (its own room excepted)."""
    found = []
    for module, targets in sorted(graph.items()):
        if not module.startswith("posttrain"):
            continue
        for target in sorted(targets):
            if not target.startswith("posttrain") or room(target) == room(module):
                continue
            if RANK.get(room(target), len(TIERS)) >= RANK.get(room(module), -1):
                found.append(f"{module} ({room(module)}) imports {target} ({room(target)})")
    return found


def package_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if target.split(".")[0] in FORBIDDEN_PACKAGES[module.split(".")[0]]
    ]


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


# ------------------------------------------------------------------------------------------- the house


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(read_tree(ROOT))


def test_every_posttrain_module_lives_in_a_drawn_room(graph):
    assert unknown_rooms(graph) == [], "add the new room to TIERS here and to docs/ARCHITECTURE.md"


def test_posttrain_rooms_point_down(graph):
    assert upward_imports(graph) == []


def test_packages_point_one_way(graph):
    assert package_violations(graph) == []
    assert any(t.startswith("rewards") for m in graph if m.startswith("posttrain") for t in graph[m])


def test_no_import_circles(graph):
    assert import_circles(graph) == []


def test_architecture_page_draws_these_tiers():
    drawn = {}
    for line in (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        if match := re.fullmatch(r"tier (\d+)\s+(.*)", line):
            drawn[int(match[1])] = set(re.sub(r"\(.*?\)", "", match[2]).replace("·", " ").split())
    assert drawn == {tier: set(rooms) for tier, rooms in enumerate(TIERS)}


# ------------------------------------------------------------------------- the checker catches breakage


def synthetic(modules: dict[str, str], packages: tuple[str, ...] = ()) -> dict[str, set[str]]:
    return import_graph({name: (text, name in packages) for name, text in modules.items()})


def test_checker_sees_an_upward_import_even_inside_a_function():
    graph = synthetic(
        {
            "posttrain.config": "",
            "posttrain.trainers.grpo": "from posttrain.config import X\n",
            "posttrain.generation.base": "def f():\n    from posttrain.trainers.grpo import evaluate\n",
            "posttrain.data.rows": "from posttrain.data import chat\n",
            "posttrain.data.chat": "",
        }
    )
    assert upward_imports(graph) == [
        "posttrain.generation.base (generation) imports posttrain.trainers.grpo (trainers)"
    ]
    assert graph["posttrain.data.rows"] == {"posttrain.data.chat"}  # `from package import module`


def test_checker_refuses_imports_between_rooms_of_one_tier_and_unknown_rooms():
    graph = synthetic(
        {"posttrain.traces.a": "import posttrain.evals.b\n", "posttrain.evals.b": "", "posttrain.x": ""}
    )
    assert upward_imports(graph) == ["posttrain.traces.a (traces) imports posttrain.evals.b (evals)"]
    assert unknown_rooms(graph) == ["x"]


def test_checker_finds_circles_through_relative_and_local_imports_but_not_type_checking_ones():
    graph = synthetic(
        {
            "sandbox.runner": "from sandbox import isolation\n",
            "sandbox.isolation": "def report():\n    from .runner import probe\n",
            "sandbox.judge": "from . import frames\n",
            "sandbox.judge.frames": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sandbox import judge\n",
            "rewards.code": "import sandbox.runner\nimport posttrain.policy\n",
        },
        packages=("sandbox.judge",),
    )
    assert import_circles(graph) == [["sandbox.isolation", "sandbox.runner"]]
    assert graph["sandbox.judge"] == {"sandbox.judge.frames"} and graph["sandbox.judge.frames"] == set()
    assert package_violations(graph) == ["rewards.code imports posttrain.policy"]
