"""Building a rollout backend by name, and the sampling parameters a recipe's `generation` section asks for.

The backends import `posttrain.generation.base`; this module imports them (lazily: vLLM and the HTTP client load
only when asked for), so nothing in `base` depends on a backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from posttrain.config import GenerationSection
from posttrain.generation.base import Backend, SamplingParams


def build_backend(kind: str, **kwargs: object) -> Backend:
    """Build a backend by name: "hf" (transformers generate), "vllm" (in-process engine), "openai" (server).

    The keyword arguments go to the backend's constructor: `HFBackend(model, tokenizer, ...)`,
    `VLLMBackend(model_path, ...)`, `OpenAIBackend(base_url, model, ...)`.
    """
    if kind == "hf":
        from posttrain.generation.hf import HFBackend

        return HFBackend(**kwargs)
    if kind == "vllm":
        from posttrain.generation.vllm import VLLMBackend

        return VLLMBackend(**kwargs)
    if kind == "openai":
        from posttrain.generation.openai import OpenAIBackend

        return OpenAIBackend(**kwargs)
    raise ValueError(f"unknown generation backend {kind!r}: choose 'hf', 'vllm' or 'openai'")


def make_backend(cfg: GenerationSection, model: torch.nn.Module, tokenizer: Any, out: Path) -> Backend:
    """The rollout engine over `model` (a bare causal LM). `hf` and `latent` generate with that module (no copy,
    nothing to sync); `vllm` starts from a snapshot of it written under `out` and receives new weights after every
    step; `openai` talks to a server. `auto` is `latent` for posttrain's DeepSeek-V3, `hf` otherwise."""
    from posttrain.model import DeepseekV3ForCausalLM

    kind = cfg.backend
    ours = isinstance(model, DeepseekV3ForCausalLM)
    if kind == "auto":
        kind = "latent" if ours else "hf"
    if kind == "latent":
        if not ours:
            raise ValueError("generation.backend=latent needs posttrain's DeepSeek-V3 (model.implementation)")
        from posttrain.generation.latent import LatentCacheBackend

        return LatentCacheBackend(model, tokenizer, **cfg.options)
    if kind == "hf":
        return build_backend("hf", model=model, tokenizer=tokenizer, **cfg.options)
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
