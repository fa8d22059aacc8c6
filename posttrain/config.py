"""Typed recipes: one YAML file fully describes a run.

Every section is a pydantic model that forbids unknown keys, so a typo is an error, not a silently ignored
setting. `load_recipe` reads the YAML, applies `dotted.key=value` overrides from the command line, validates,
and turns every problem into a `RecipeError` that names the file, the key's line and the key (or the override
that set it) — before any model is loaded, including a generation backend that cannot drive the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.errors import Origins, Problem, RecipeError, locate, recipe_origins, validation_problems
from posttrain.overrides import apply_overrides
from posttrain.package_files import PACKAGE_PREFIX, package_file


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LoraSection(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class MTPSection(Section):
    """Multi-token prediction kept on during SFT (DeepSeek-V3 §2.2): L = L_main + λ/D · Σ_k L_mtp_k."""

    enabled: bool = True
    weight: float = Field(
        0.3, ge=0.0, description="λ in the report; 0.3 early, 0.1 later in V3's pre-training"
    )
    attach_depth: int = Field(
        0, ge=0, description="attach D MTP modules to a plain transformers model (shares embedding and head)"
    )


class ModelSection(Section):
    path: str | None = Field(
        None,
        description="local HF directory, a .gguf file or pkg:PACKAGE/FILE.gguf (converted once, cached; see "
        "posttrain.model.gguf), or a hub name when there is network",
    )
    from_config: str | None = Field(
        None, description="config.json to build a randomly initialised model from"
    )
    tokenizer: str | None = Field(None, description="tokenizer directory; defaults to `path`")
    implementation: Literal["auto", "posttrain", "transformers"] = Field(
        "auto",
        description="auto: posttrain's own DeepSeek-V3 modules for deepseek_v3 configs, else transformers",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "varlen", "flex_attention"] = Field(
        "auto",
        description="auto = varlen (per-sample kernels, no dense mask) on CUDA, sdpa on CPU; posttrain's DeepSeek-V3 "
        "takes auto|varlen|sdpa, auto = varlen on every device",
    )
    lora: LoraSection | None = None
    mtp: MTPSection = MTPSection()
    expert_bias_update: float = Field(
        0.001, ge=0.0, description="γ of auxiliary-loss-free balancing (MoE models only); 0 disables"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.path is None) == (self.from_config is None):
            raise ValueError("set exactly one of `path` and `from_config`")
        if self.from_config is not None and self.tokenizer is None:
            raise ValueError("`from_config` needs `tokenizer`")
        return self


class DataSources(Section):
    train: list[str] = Field(
        ..., min_length=1, description="JSONL/Parquet files, `datasets` dirs, or hub:NAME"
    )
    eval: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _one_path_is_a_list(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("train", "eval"):
                if isinstance(values.get(key), str):
                    values = {**values, key: [values[key]]}
        return values


class DataSection(DataSources):
    format: Literal["auto", "messages", "prompt_completion"] = "auto"
    messages_field: str = "messages"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    system_prompt: str | None = None
    loss_on: Literal["assistant", "all"] = "assistant"
    on_bad_row: Literal["error", "skip"] = "error"
    max_seq_len: int = Field(2048, gt=1)
    overlong: Literal["truncate", "drop"] = "truncate"
    num_proc: int = Field(1, ge=1, description="processes for tokenisation")
    cache_dir: str | None = Field(
        None, description="tokenisation cache; default: the `datasets` cache directory"
    )


class PackingSection(Section):
    enabled: bool = True
    capacity: int | None = Field(None, gt=1, description="tokens per pack; defaults to data.max_seq_len")


class TrainSection(Section):
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimiser steps")
    micro_batch_size: int = Field(1, gt=0, description="packs per forward pass")
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(5e-6, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    loss_chunk_size: int | None = Field(
        4096,
        gt=0,
        description="rows per chunk of the fused head + loss (no [tokens, vocab] logits); None: plain",
    )
    compile_blocks: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder block (transformers models); auto: on CUDA only"
    )
    fp8: bool = Field(
        False,
        description="DeepSeek-V3's block-wise FP8 GEMMs for the linear layers (not embedding/head/gate)",
    )

    @model_validator(mode="after")
    def _lr_range(self) -> TrainSection:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        return self


class LoggingSection(Section):
    every: int = Field(1, gt=0)
    tensorboard: bool = True
    progress: bool = True


class SampleLoggingSection(Section):
    samples: int = Field(
        4, ge=0, description="sample completions per step written to samples.jsonl and report.md; 0: none"
    )


class RolloutLoggingSection(LoggingSection, SampleLoggingSection):
    """Logging of a run that samples completions (GRPO)."""


class CheckpointSection(Section):
    every: int = Field(0, ge=0, description="optimiser steps between checkpoints; 0 = only at the end")
    keep: int = Field(2, gt=0)


class SFTRecipe(Section):
    model: ModelSection
    data: DataSection
    packing: PackingSection = PackingSection()
    train: TrainSection = TrainSection()
    logging: LoggingSection = LoggingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    output_dir: str

    @property
    def pack_capacity(self) -> int:
        return self.packing.capacity or self.data.max_seq_len


class PromptDataSection(DataSources):
    """Prompts plus the columns rewards read (`answer`, `tests`, ...)."""

    prompt_field: str = "prompt"
    system_prompt: str | None = None
    max_prompt_tokens: int | None = Field(None, gt=0)


class SamplerPerturbation(Section):
    """Experiments only (issue 10): rollouts come from a perturbed policy, the trainer differentiates the clean
    one, evaluation uses the clean one. See posttrain.generation.perturbed."""

    temperature_factor: float = Field(1.0, gt=0, description="the sampler's temperature is T times this")
    weight_noise: float = Field(
        0.0, ge=0, description="σ: the sampler's weights are W + σ·rms(W)·ε, ε redrawn at every sync"
    )
    logit_bias_std: float = Field(
        0.0,
        ge=0,
        description="σ_b: a fixed N(0, σ_b²) offset on each vocabulary entry's logit (hf/latent backends)",
    )
    seed: int = 0


class GenerationSection(Section):
    backend: Literal["auto", "hf", "latent", "vllm", "openai"] = Field(
        "auto",
        description="auto: `latent` (our absorbed-MLA decoding) for posttrain's DeepSeek-V3, `hf` otherwise",
    )
    max_tokens: int = Field(256, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = []
    seed: int = 0
    options: dict[str, Any] = Field(
        {}, description="backend constructor arguments (vllm.LLM kwargs, base_url...)"
    )
    sampler_perturbation: SamplerPerturbation | None = None


# vLLM 0.32 attends MLA models over a latent cache of kv_lora_rank + qk_rope_head_dim numbers per token. Its
# CPU kernels (CPU_MLA, AMX_MLA) take only 576 (DeepSeek-V3's 512 + 64); on GPU its MLA metadata takes 320,
# 512 or 576.
VLLM_MLA_WIDTHS = {"cpu": (576,), "gpu": (320, 512, 576)}


def uses_posttrain_model(implementation: str, model_type: str) -> bool:
    """Whether a model of `model_type` is built from posttrain's own DeepSeek-V3 modules."""
    return model_type == "deepseek_v3" and implementation != "transformers"


def backend_problem(
    backend: str, model_config: dict[str, Any], posttrain_model: bool, on_gpu: bool
) -> str | None:
    """Why generation `backend` cannot drive a model of this config, naming the backend that can; None when
    it can."""
    if backend == "hf" and posttrain_model:
        return (
            "'hf' drives transformers models, not posttrain's DeepSeek-V3 (model.implementation "
            "auto|posttrain picks it for deepseek_v3 configs); use generation.backend=latent (our "
            "absorbed-MLA decoding) or auto"
        )
    if backend == "latent" and not posttrain_model:
        return (
            f"'latent' drives posttrain's DeepSeek-V3 only, and this model is transformers' "
            f"{model_config.get('model_type')!r}; use generation.backend=auto or hf"
        )
    if backend == "vllm" and model_config.get("kv_lora_rank") is not None:
        kv_lora, rope = model_config["kv_lora_rank"], model_config.get("qk_rope_head_dim", 0)
        device = "gpu" if on_gpu else "cpu"
        widths = " or ".join(map(str, VLLM_MLA_WIDTHS[device]))
        if kv_lora + rope not in VLLM_MLA_WIDTHS[device]:
            return (
                f"vLLM's {device.upper()} MLA attention needs kv_lora_rank + qk_rope_head_dim = {widths} "
                f"(DeepSeek-V3: 512 + 64), this model has {kv_lora} + {rope} = {kv_lora + rope}; use "
                "generation.backend=auto (latent: our absorbed-MLA decoding, for posttrain's DeepSeek-V3) or hf"
            )
    return None


def recipe_backend_problem(generation: GenerationSection, model: ModelSection) -> str | None:
    """`backend_problem` for a recipe, read from the model's config.json alone (no weights); None when the
    config is not a local file (hub name, GGUF: transformers models)."""
    config_file = Path(model.from_config) if model.from_config else Path(str(model.path)) / "config.json"
    if generation.backend in ("auto", "openai") or not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    posttrain_model = uses_posttrain_model(model.implementation, config.get("model_type", ""))
    on_gpu = False
    if generation.backend == "vllm":
        import torch

        on_gpu = torch.cuda.is_available()
    return backend_problem(generation.backend, config, posttrain_model, on_gpu)


class RewardItem(Section):
    name: str = Field(..., description="registered name, entry point, or dotted path to a function")
    weight: float = 1.0
    kwargs: dict[str, Any] = {}
    timeout_s: float | None = Field(None, gt=0)
    completions_as: Literal["text", "messages"] = Field(
        "text",
        description="'messages' for TRL-style rewards that read [{'role': 'assistant', 'content': ...}]",
    )


class RewardsSection(Section):
    functions: list[RewardItem] = Field(..., min_length=1)
    workers: int | None = Field(None, gt=0, description="reward worker processes; default: CPU count")
    timeout_s: float = Field(
        10.0, gt=0, description="hard bound per reward call; the worker is killed after it"
    )


class GRPOSection(Section):
    prompts_per_step: int = Field(8, gt=0, description="prompts per rollout batch (over all ranks)")
    num_generations: int = Field(8, gt=1, description="G completions per prompt")
    num_iterations: int = Field(1, gt=0, description="μ optimisation passes per rollout batch")
    micro_batch_size: int = Field(8, gt=0, description="sequences per forward/backward")
    pack_tokens: int | None = Field(
        None,
        gt=0,
        description="score rollouts as packed rows of up to this many tokens (no padding); None: padded rows "
        "of micro_batch_size sequences",
    )
    share_prompt: bool = Field(
        False,
        description="score each prompt once for its G completions (one row: prompt ‖ completion_1 ‖ … with a "
        "dense attention mask); fewer tokens through the model when prompts are long, for SDPA attention",
    )
    dynamic_sampling: bool = Field(
        False, description="drop groups whose rewards are all equal, refill (DAPO)"
    )
    max_refill_rounds: int = Field(4, ge=0)
    ref_refresh_every: int = Field(0, ge=0, description="copy the policy into the reference every N steps")
    loss: dict[str, Any] = Field({}, description="posttrain.algorithms.grpo.GRPOLossConfig fields")

    @model_validator(mode="after")
    def _loss_fields(self) -> GRPOSection:
        if not self.loss:  # the defaults: nothing to check, and `posttrain --help` need not import torch
            return self
        import dataclasses

        from posttrain.algorithms.grpo import GRPOLossConfig

        known = {f.name for f in dataclasses.fields(GRPOLossConfig)}
        unknown = sorted(set(self.loss) - known)
        if unknown:
            raise ValueError(f"unknown grpo.loss keys {unknown}; known: {sorted(known)}")
        GRPOLossConfig(**self.loss)
        return self


class AccuracyEvalSection(Section):
    """How held-out accuracy is measured: greedy, or pass@1 averaged over samples (as R1 reports it)."""

    accuracy_reward: str = Field("math_accuracy", description="the reward whose mean is reported as accuracy")
    temperature: float = Field(0.0, ge=0, description="0: greedy decoding; > 0: sample at this temperature")
    samples: int = Field(1, gt=0, description="samples per prompt when temperature > 0")


class EvalSection(AccuracyEvalSection):
    every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after training)")
    max_prompts: int | None = Field(None, gt=0)


class GRPORecipe(Section):
    model: ModelSection
    data: PromptDataSection
    generation: GenerationSection = GenerationSection()
    rewards: RewardsSection
    grpo: GRPOSection = GRPOSection()
    train: TrainSection = TrainSection(lr=1e-6, min_lr=1e-6, epochs=1)
    eval: EvalSection = EvalSection()
    logging: RolloutLoggingSection = RolloutLoggingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    output_dir: str


RecipeT = TypeVar("RecipeT", bound=BaseModel)

# Keys whose values are paths that must exist before anything heavy starts.
_PATH_KEYS = ("model.from_config", "model.tokenizer", "data.train", "data.eval")


def _path_problems(path: str, raw: dict[str, Any], origins: Origins) -> list[Problem]:
    """Every path the recipe names that does not exist (hub names excepted)."""
    found = []
    for dotted in (*_PATH_KEYS, "model.path"):
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values = list(enumerate(node)) if isinstance(node, list) else [(None, node)]
        for index, value in values:
            if not isinstance(value, str) or value.startswith("hub:"):
                continue
            key = (*dotted.split("."), *([] if index is None else [str(index)]))
            if value.startswith(PACKAGE_PREFIX):
                try:
                    package_file(value)
                except (FileNotFoundError, ValueError) as exc:
                    found.append(locate(path, origins, key, dotted, str(exc)))
            elif dotted != "model.path" and not os.path.exists(value):
                found.append(locate(path, origins, key, dotted, f"file not found: {value}"))
            elif dotted == "model.path" and _looks_local(value) and not os.path.exists(value):
                found.append(locate(path, origins, key, dotted, f"directory not found: {value}"))
    return found


def _looks_local(name: str) -> bool:
    """A hub id is `org/name`; anything else with a path separator or a dot prefix is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def load_recipe(
    path: str | os.PathLike, schema: type[RecipeT], overrides: list[str] | None = None
) -> RecipeT:
    """Read, override and validate a recipe; every problem names `path`, the key's line and the key (or the
    override that set it), all problems at once, before any model is loaded."""
    path, overrides = str(path), overrides or []
    if not Path(path).is_file():
        raise RecipeError("recipe file not found", file=path)
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        raise RecipeError(
            f"not valid YAML: {getattr(exc, 'problem', None) or exc}", file=path, where=where
        ) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a mapping of sections, got {type(raw).__name__}", file=path)
    raw = apply_overrides(raw, overrides)
    origins = recipe_origins(text, overrides)
    try:
        recipe = schema.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(problems=validation_problems(path, exc, raw, origins)) from None
    problems = _path_problems(path, raw, origins)
    generation, model = getattr(recipe, "generation", None), getattr(recipe, "model", None)
    if not problems and isinstance(generation, GenerationSection) and isinstance(model, ModelSection):
        message = recipe_backend_problem(generation, model)
        if message:
            problems = [locate(path, origins, ("generation", "backend"), "generation.backend", message)]
    if problems:
        raise RecipeError(problems=problems)
    return recipe


def dump_recipe(recipe: BaseModel, path: str | os.PathLike) -> None:
    """Write the fully resolved recipe next to a run's outputs, so the run can be reproduced from it alone."""
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
