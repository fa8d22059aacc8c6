"""The `posttrain traces` recipe: teacher, prompts, sampling, rewards, acceptance rule, filters, output."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config import (
    GenerationSection,
    ModelSection,
    PromptDataSection,
    RewardsSection,
    SampleLoggingSection,
    Section,
)

R1_SYSTEM_PROMPT = (
    "Think the problem through inside <think></think> before answering: reason step by step, reflect on "
    "each step and verify the result. Then give the final answer clearly after </think>."
)


class AcceptSection(Section):
    """Which verified samples to keep. A sample is verified when its total reward is at least `threshold`."""

    rule: Literal["all_correct", "best_of_n"] = Field(
        "all_correct",
        description="all_correct: every verified sample that passes the filters, up to max_per_prompt; "
        "best_of_n: the single highest-reward one",
    )
    num_samples: int = Field(4, gt=0, description="N completions sampled per prompt")
    max_per_prompt: int = Field(1, gt=0, description="k: accepted samples kept per prompt (all_correct)")
    threshold: float = Field(1.0, description="minimum total reward of a verified sample")
    pass_at_k: list[int] = Field([1, 2, 4], description="k values of the pass@k report (k <= num_samples)")


class FiltersSection(Section):
    """Readability filters applied to every sample; null switches a filter off."""

    max_tokens: int | None = Field(None, gt=0, description="longest completion kept (tokens)")
    require_format: bool = Field(True, description="<think>reasoning</think> then a non-empty answer")
    think_opened_by_prompt: bool = Field(False, description="the chat template already wrote <think>")
    language_consistency: float | None = Field(
        0.05, ge=0, le=1, description="max share of letters in another script than the prompt's"
    )
    repetition_ngram: int = Field(8, gt=0)
    max_repeated_ngram_fraction: float | None = Field(0.5, ge=0, le=1)
    max_think_tokens: int | None = Field(None, gt=0, description="overthinking cap (tokens)")
    max_think_ratio: float | None = Field(
        None, ge=1, description="overthinking cap relative to the shortest verified sample of the prompt"
    )


class OutputSection(Section):
    shard_rows: int = Field(10_000, gt=0, description="rows per JSONL part before a new one starts")
    r1_system_prompt: str | None = Field(
        R1_SYSTEM_PROMPT, description="system prompt of the R1-format rows; null: the prompt's own"
    )
    original_response: Literal["answer", "full"] = Field(
        "answer", description="response of the <problem, original response> rows: the part after </think>"
    )


class RunSection(Section):
    batch_prompts: int = Field(64, gt=0, description="prompts per generate call and per ledger commit")
    max_attempts: int = Field(3, gt=0, description="tries per prompt when the backend raises")
    backoff_s: float = Field(2.0, ge=0, description="first retry delay; doubles on every attempt")
    concurrency: int = Field(8, gt=0, description="prompts retried at the same time after a batch failed")
    max_prompts: int | None = Field(None, gt=0, description="stop after the first N prompts")


class TracesRecipe(Section):
    model: ModelSection = Field(..., description="the teacher (openai backend: only its tokenizer is read)")
    teacher_name: str | None = Field(None, description="provenance label; default: model.path")
    data: PromptDataSection
    generation: GenerationSection = GenerationSection(temperature=0.7, max_tokens=1024)
    rewards: RewardsSection
    accept: AcceptSection = AcceptSection()
    filters: FiltersSection = FiltersSection()
    output: OutputSection = OutputSection()
    run: RunSection = RunSection()
    logging: SampleLoggingSection = SampleLoggingSection()
    output_dir: str

    @model_validator(mode="after")
    def _pass_at_k_within_n(self) -> TracesRecipe:
        too_big = [k for k in self.accept.pass_at_k if k > self.accept.num_samples or k < 1]
        if too_big:
            raise ValueError(
                f"accept.pass_at_k {too_big} must lie in 1..accept.num_samples ({self.accept.num_samples})"
            )
        return self
