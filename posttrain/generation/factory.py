"""Building a rollout backend by name, and the sampling parameters a recipe's `generation` section asks for.

The backends import `posttrain.generation.base`; this module imports them (lazily: vLLM and the HTTP client load
only when asked for), so nothing in `base` depends on a backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from posttrain.config import GenerationSection, RecipeError, backend_problem
from posttrain.generation.base import Backend, SamplingParams


def build_backend(kind: str, **kwargs: object) -> Backend:
    """Build a backend by name: "hf" (transformers generate), "vllm" (in-process engine), "openai" (server).

    The keyword arguments go to the backend's constructor: `HFBackend(model, tokenizer, ...)`,
    `VLLMBackend(model_path, ...)`, `OpenAIBackend(base_url, model, ...)`. A model the backend cannot drive
    is refused before the backend starts (see `posttrain.config.backend_problem`).
    """
    if kind == "hf":
        from posttrain.generation.hf import HFBackend
        from posttrain.model import DeepseekV3ForCausalLM

        model = kwargs.get("model")
        if isinstance(model, DeepseekV3ForCausalLM):
            _refuse("hf", model.config.to_dict(), posttrain_model=True)
        return HFBackend(**kwargs)
    if kind == "vllm":
        config_file = Path(str(kwargs.get("model_path"))) / "config.json"
        if config_file.is_file():
            _refuse("vllm", json.loads(config_file.read_text()), posttrain_model=False)
        from posttrain.generation.vllm import VLLMBackend

        return VLLMBackend(**kwargs)
    if kind == "openai":
        from posttrain.generation.openai import OpenAIBackend

        return OpenAIBackend(**kwargs)
    raise ValueError(f"unknown generation backend {kind!r}: choose 'hf', 'vllm' or 'openai'")


def _refuse(kind: str, model_config: dict[str, Any], posttrain_model: bool) -> None:
    problem = backend_problem(kind, model_config, posttrain_model, on_gpu=torch.cuda.is_available())
    if problem:
        raise RecipeError(problem, field="generation.backend")


def make_backend(
    cfg: GenerationSection,
    model: torch.nn.Module,
    tokenizer: Any,
    out: Path,
    autocast: torch.dtype | None = None,
) -> Backend:
    """The rollout engine over `model` (a bare causal LM). `hf` and `latent` generate with that module (no copy,
    nothing to sync); `vllm` starts from a snapshot of it written under `out` and receives new weights after every
    step; `openai` talks to a server. `auto` is `latent` for posttrain's DeepSeek-V3, `hf` otherwise.

    `autocast` is the trainer's mixed-precision dtype: `hf` and `latent` decode under it (unless
    `generation.options` sets `autocast` itself, null for the weights' own precision)."""
    from posttrain.model import DeepseekV3ForCausalLM

    kind = cfg.backend
    ours = isinstance(model, DeepseekV3ForCausalLM)
    if kind == "auto":
        kind = "latent" if ours else "hf"
    _refuse(kind, model.config.to_dict(), posttrain_model=ours)  # before a vLLM snapshot is written
    if kind == "latent":
        from posttrain.generation.latent import LatentCacheBackend

        return LatentCacheBackend(model, tokenizer, **{"autocast": autocast, **cfg.options})
    if kind == "hf":
        options = {"autocast": autocast, **cfg.options}
        return build_backend("hf", model=model, tokenizer=tokenizer, **options)
    if kind == "vllm":
        snapshot = out / "rollout_init"
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        return build_backend("vllm", model_path=str(snapshot), seed=cfg.seed, **cfg.options)
    return build_backend("openai", **cfg.options)


def sampling_params(cfg: GenerationSection, n: int, seed: int, greedy: bool = False) -> SamplingParams:
    """`n` completions per prompt as the section asks (greedy: temperature 0, no nucleus)."""
    return SamplingParams(
        n=n,
        max_tokens=cfg.max_tokens,
        temperature=0.0 if greedy else cfg.temperature,
        top_p=1.0 if greedy else cfg.top_p,
        stop=list(cfg.stop),
        seed=seed,
    )
