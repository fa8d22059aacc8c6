"""RewardBench evaluation of reward models and generative judges on a local copy of the data.

`run_rewardbench` loads the pairs (pairs.py), scores each with a sequence classifier or a pairwise judge
(here), aggregates by RewardBench's rules (scoring.py, which cites the reference code for every rule) and writes
the report (report.py).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.evals.pairs import Pair, conversation, load_pairs, sample_pairs
from posttrain.evals.report import write_report
from posttrain.evals.scoring import PairResult, classifier_pair_score, judge_pair_score, summarize

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# ------------------------------------------------------------------------------------------ pair scores


class Judge(Protocol):
    """What ``rewards.judge.PairwiseJudge`` provides: per pair, its verdicts ("A", "B", "tie", "unparseable")
    in terms of the order it was given, whatever orders it showed the judge model."""

    def verdicts(
        self, prompts: list[str], responses_a: list[str], responses_b: list[str]
    ) -> list[list[str]]: ...


def score_with_judge(pairs: Sequence[Pair], judge: Judge, seed: int) -> list[PairResult]:
    """Asks the judge about every pair, the chosen response placed at A or B by a seeded coin per pair."""
    coin = random.Random(seed)
    chosen_positions = ["B" if coin.random() < 0.5 else "A" for _ in pairs]
    shown = [
        (p.chosen, p.rejected) if position == "A" else (p.rejected, p.chosen)
        for p, position in zip(pairs, chosen_positions, strict=True)
    ]
    responses_a, responses_b = [a for a, _ in shown], [b for _, b in shown]
    all_verdicts = judge.verdicts([p.prompt for p in pairs], responses_a, responses_b)
    if len(all_verdicts) != len(pairs):
        raise RuntimeError(f"judge returned {len(all_verdicts)} verdict lists for {len(pairs)} pairs")
    return [
        PairResult(
            id=pair.id,
            subset=pair.subset,
            score=judge_pair_score(verdicts, position),
            chosen_position=position,
            verdicts=list(verdicts),
        )
        for pair, position, verdicts in zip(pairs, chosen_positions, all_verdicts, strict=True)
    ]


def verdict_summary(results: Sequence[PairResult], votes: int) -> dict:
    """What a judge's verdicts say beside accuracy: their counts, the unparseable share, and among the readable
    A/B verdicts the share that picked the answer shown first (0.5: no position preference; 1.0: the judge
    always takes the first answer, and asked in both orders it then ties every pair). Each pair's verdicts are
    its `votes` for the order (A, B) first, then those for (B, A), in the original labels."""
    counts = Counter(v for result in results for v in result.verdicts)
    first_shown = [
        verdict == ("A" if k < votes else "B")
        for result in results
        for k, verdict in enumerate(result.verdicts)
        if verdict in ("A", "B")
    ]
    total = sum(counts.values())
    return {
        "verdict_counts": dict(counts),
        "unparseable_rate": counts["unparseable"] / total if total else None,
        "first_shown_rate": sum(first_shown) / len(first_shown) if first_shown else None,
    }


def classifier_rewards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    batch_size: int,
    max_length: int,
) -> list[float]:
    """Scalar rewards of chat-templated conversations, batched by length (less padding), right-padded.

    The model pools the logit of the last non-padding token, so a right-padded batch gives the rewards of
    unbatched calls (causal attention never looks at the padding that follows).
    """
    import torch

    if tokenizer.chat_template is None:
        raise ValueError(
            "the reward model's tokenizer has no chat template; RewardBench scores chat-formatted text"
        )
    # The template already writes the special tokens: adding them again would double a BOS.
    token_ids = [
        tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"][
            -max_length:
        ]
        for c in conversations
    ]
    pad_id = model.config.get_text_config().pad_token_id
    device = next(model.parameters()).device
    rewards = [0.0] * len(token_ids)
    by_length = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    for start in range(0, len(by_length), batch_size):
        batch = by_length[start : start + batch_size]
        width = max(len(token_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(token_ids[i])] = torch.tensor(token_ids[i])
            attention_mask[row, : len(token_ids[i])] = 1
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, i in enumerate(batch):
            rewards[i] = float(logits[row, 0])
    return rewards


def load_classifier(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local AutoModelForSequenceClassification with one output (the reward) and its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"reward model directory not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if model.config.num_labels != 1:
        raise ValueError(
            f"{path}: a reward model has one output (num_labels=1), this one has {model.config.num_labels}"
        )
    if model.config.get_text_config().pad_token_id is None:
        # Without a pad id the model cannot find the last real token of a padded batch.
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError(f"{path}: neither the model config nor the tokenizer defines a pad or eos token")
        model.config.get_text_config().pad_token_id = pad_id
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


def score_with_classifier(
    pairs: Sequence[Pair],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    max_length: int,
) -> list[PairResult]:
    conversations = [conversation(p.prompt, p.chosen) for p in pairs] + [
        conversation(p.prompt, p.rejected) for p in pairs
    ]
    rewards = classifier_rewards(model, tokenizer, conversations, batch_size, max_length)
    chosen_rewards, rejected_rewards = rewards[: len(pairs)], rewards[len(pairs) :]
    return [
        PairResult(
            id=pair.id,
            subset=pair.subset,
            score=classifier_pair_score(chosen, rejected),
            chosen_reward=chosen,
            rejected_reward=rejected,
        )
        for pair, chosen, rejected in zip(pairs, chosen_rewards, rejected_rewards, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ config


class JudgeConfig(BaseModel):
    """A generative judge from ``rewards.judge``: a local transformers model or an OpenAI-compatible server."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hf", "openai"]
    model: str = Field(
        description="hf: a local model directory, .gguf file or pkg:PACKAGE/FILE.gguf; openai: the served "
        "model's name"
    )
    base_url: str | None = Field(
        default=None, description="openai: server URL, e.g. http://127.0.0.1:8000/v1"
    )
    api_key_env: str | None = Field(default=None, description="openai: environment variable holding the key")
    votes: int = Field(default=1, ge=1, description="samples per order; the majority verdict decides")
    both_orders: bool = Field(default=True, description="also ask with A and B swapped (position bias)")
    template: str | None = Field(
        default=None,
        description="prompt with {prompt}, {response_a}, {response_b}; None: rewards' default (explanation, then "
        "[[A]]/[[B]]/[[C]]); 'letter': rewards' LETTER_TEMPLATE, a bare A or B, for small judges",
    )
    max_new_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("judge.base_url is required for kind 'openai'")
        if self.kind == "hf" and (self.base_url or self.api_key_env):
            raise ValueError("judge.base_url and judge.api_key_env only apply to kind 'openai'")
        if self.votes > 1 and self.temperature == 0:
            raise ValueError("judge.votes > 1 needs judge.temperature > 0: greedy votes are all the same")
        return self


class RewardBenchConfig(BaseModel):
    """What ``run_rewardbench`` evaluates: exactly one of ``model`` (a classifier) or ``judge``."""

    model_config = ConfigDict(extra="forbid")

    data: Path = Field(description="RewardBench-format .jsonl/.json/.parquet file or directory")
    model: Path | None = Field(default=None, description="AutoModelForSequenceClassification directory")
    judge: JudgeConfig | None = None
    output_dir: Path
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(
        default=2048, ge=1, description="classifier tokens kept, truncating from the left"
    )
    seed: int = 0
    max_pairs: int | None = Field(
        default=None, ge=1, description="evaluate a seeded sample of this many pairs"
    )

    @model_validator(mode="after")
    def _one_scorer(self) -> RewardBenchConfig:
        if (self.model is None) == (self.judge is None):
            raise ValueError(
                "set exactly one of 'model' (a reward classifier) or 'judge' (a generative judge)"
            )
        return self


def build_judge(config: JudgeConfig, batch_size: int = 8) -> Judge:
    from rewards.judge import LETTER_TEMPLATE, OpenAIChatGenerator, PairwiseJudge, TransformersGenerator

    if config.kind == "hf":
        from posttrain.model.gguf import resolve_model_path

        generate = TransformersGenerator(
            resolve_model_path(config.model),  # a .gguf or pkg: file: its converted checkpoint
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            batch_size=batch_size,
        )
    else:
        api_key = None
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env)
            if not api_key:
                raise ValueError(f"judge.api_key_env: environment variable {config.api_key_env} is not set")
        generate = OpenAIChatGenerator(
            config.base_url,
            config.model,
            api_key=api_key,
            temperature=config.temperature,
            max_tokens=config.max_new_tokens,
        )
    template = LETTER_TEMPLATE if config.template == "letter" else config.template
    return PairwiseJudge(generate, template=template, votes=config.votes, both_orders=config.both_orders)


def run_rewardbench(config: RewardBenchConfig) -> dict:
    """Scores the pairs, writes results.json, verdicts.jsonl and one bar chart per section to
    ``config.output_dir``, prints the table, and returns the results dictionary."""
    pairs = sample_pairs(load_pairs(config.data), config.max_pairs, config.seed)
    if config.model is not None:
        model, tokenizer = load_classifier(config.model)
        results = score_with_classifier(pairs, model, tokenizer, config.batch_size, config.max_length)
        scorer = {"type": "classifier", "model": str(config.model)}
    else:
        results = score_with_judge(pairs, build_judge(config.judge, config.batch_size), config.seed)
        scorer = {"type": "judge", **config.judge.model_dump()}
    summary = {"scorer": scorer, "data": str(config.data), "seed": config.seed, **summarize(results)}
    if config.judge is not None:
        # Separates real ties from verdicts the judge never wrote readably, which also score 0.5.
        summary.update(verdict_summary(results, config.judge.votes))
    # Each pair's text goes with its outcome, so errors can be read without reopening the data.
    rows = [
        {
            **{key: value for key, value in asdict(result).items() if value is not None},
            "prompt": pair.prompt,
            "chosen": pair.chosen,
            "rejected": pair.rejected,
        }
        for pair, result in zip(pairs, results, strict=True)
    ]
    write_report(summary, rows, config.output_dir)
    return summary
