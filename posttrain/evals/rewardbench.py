"""RewardBench evaluation of reward models and generative judges on a local copy of the data.

Scoring follows the reward-bench repository (github allenai/reward-bench, read at commit 05a9005e):

* A pair is the user ``prompt`` with a ``chosen`` and a ``rejected`` assistant response; each conversation is
  ``[{"role": "user", ...}, {"role": "assistant", ...}]`` (``rewardbench/utils.py::load_eval_dataset``).
* Sequence classifier: the pair is correct iff ``reward(chosen) > reward(rejected)``, strictly, so a tie counts
  as wrong (``scripts/run_rm.py``: ``1 if chosen > rejected else 0``). Inputs are truncated from the left to
  ``max_length`` tokens (``run_rm.py`` sets ``truncation_side = "left"``, ``--max_length 2048``).
* Generative judge: chosen is shown as A or B at random per pair (``scripts/run_generative.py``:
  ``is_shuffled = np.random.rand() > 0.5``). Several verdicts of one pair are reduced by majority
  (``max(set(winner), key=winner.count)``, used there for judge ensembles); the winner scores 1 if it is the
  chosen response, 0 if it is the rejected one, and 0.5 otherwise ("error", i.e. unparseable, is "effectively
  a tie"). Where RewardBench breaks a split vote arbitrarily (``max`` over a set), we score it 0.5: a split is
  a tie.
* Per-subset accuracy is the mean pair score of the subset (``run_generative.py``/``run_rm.py``:
  ``num_correct / num_total``).
* A section's score is the mean of its subsets' accuracies weighted by ``EXAMPLE_COUNTS``, the benchmark's
  prompt counts per subset, with math-prm upweighted from its 447 pairs to 984 so that math weighs as much as
  the six code subsets together (``rewardbench/constants.py``; ``rewardbench/utils.py::
  calculate_scores_per_section``). The weights are the benchmark's, whatever the number of pairs in the file.
* The overall score is the plain mean of the four sections (``analysis/get_benchmark_results.py::
  get_average_over_rewardbench``, whose optional "Prior Sets" column the current leaderboard no longer has).

One deliberate difference: ``calculate_scores_per_section`` gives a section with no evaluated subset a score of
0. We leave such a section out, average the sections that were evaluated and list the missing ones in the
results, so a partial run never reports a made-up 0.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Prompt counts per subset of the filtered RewardBench set (rewardbench/constants.py::EXAMPLE_COUNTS).
EXAMPLE_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "math-prm": 984,  # 447 real pairs, weighted like the 6 x 164 code pairs
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}

# Subsets of each section (rewardbench/constants.py::SUBSET_MAPPING).
SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}

# --------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Pair:
    id: str
    subset: str
    prompt: str
    chosen: str
    rejected: str


def _pair_from_row(row: object, where: str, index: int) -> Pair:
    """Validates one record; ``where`` names the file and row for the error message."""
    if not isinstance(row, dict):
        raise ValueError(
            f"{where}: expected an object with prompt/chosen/rejected/subset, got {type(row).__name__}"
        )
    fields = {}
    for name in ("prompt", "chosen", "rejected", "subset"):
        if name not in row or row[name] is None:
            raise ValueError(f"{where}: missing field '{name}'")
        if not isinstance(row[name], str):
            raise ValueError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
        fields[name] = row[name]
    if not fields["subset"].strip():
        raise ValueError(f"{where}: field 'subset' is empty")
    pair_id = row.get("id")
    if pair_id is None:
        pair_id = index
    elif isinstance(pair_id, bool) or not isinstance(pair_id, (int, str)):
        raise ValueError(f"{where}: field 'id' must be an integer or a string, got {type(pair_id).__name__}")
    return Pair(id=str(pair_id), **fields)


def _rows_of_file(path: Path) -> list[tuple[str, object]]:
    """(location, record) for every record of one JSONL, JSON or Parquet file."""
    if path.suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}: line {line_number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number}: invalid JSON ({error.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a .json file must hold a list of records; use .jsonl for one per line")
        return [(f"{path}: record {i + 1}", record) for i, record in enumerate(records)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}: row {i + 1}", record) for i, record in enumerate(pq.read_table(path).to_pylist())]
    raise ValueError(f"{path}: unsupported file type '{path.suffix}' (expected .jsonl, .json or .parquet)")


def _rows_of_saved_dataset(path: Path) -> list[tuple[str, object]]:
    """Records of a ``datasets`` ``save_to_disk`` directory (a Dataset, or a DatasetDict with one split or a
    'filtered' split, RewardBench's name for its evaluation split)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "filtered" in loaded:
            split = "filtered"
        elif len(loaded) == 1:
            split = next(iter(loaded))
        else:
            raise ValueError(f"{path}: dataset has splits {sorted(loaded)}; save the split to evaluate alone")
        loaded = loaded[split]
    return [(f"{path}: row {i + 1}", record) for i, record in enumerate(loaded)]


def load_pairs(path: str | Path) -> list[Pair]:
    """Loads RewardBench-format pairs (columns ``prompt``, ``chosen``, ``rejected``, ``subset``, optional
    ``id``; other columns such as ``chosen_model`` are ignored) from a .jsonl/.json/.parquet file, a
    ``datasets.save_to_disk`` directory, or a directory of such files (read in name order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"RewardBench data not found: {path}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            rows = _rows_of_saved_dataset(path)
        else:
            files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
            if not files:
                raise ValueError(f"{path}: no .jsonl, .json or .parquet files and no saved dataset")
            rows = [row for file in files for row in _rows_of_file(file)]
    else:
        rows = _rows_of_file(path)
    if not rows:
        raise ValueError(f"{path}: no pairs")
    pairs = [_pair_from_row(record, where, index) for index, (where, record) in enumerate(rows)]
    first_seen: dict[str, str] = {}
    for (where, _), pair in zip(rows, pairs, strict=True):
        if pair.id in first_seen:
            raise ValueError(f"{where}: duplicate id '{pair.id}' (first at {first_seen[pair.id]})")
        first_seen[pair.id] = where
    return pairs


def sample_pairs(pairs: Sequence[Pair], max_pairs: int | None, seed: int) -> list[Pair]:
    """A seeded uniform sample of at most ``max_pairs`` pairs, in file order (subsets keep their share)."""
    if max_pairs is None or max_pairs >= len(pairs):
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), max_pairs))
    return [pairs[i] for i in keep]


def conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# ------------------------------------------------------------------------------------------ pair scores


@dataclass
class PairResult:
    """The outcome of one pair; ``score`` is 1 (chosen preferred), 0 (rejected preferred) or 0.5 (tie)."""

    id: str
    subset: str
    score: float
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    chosen_position: str | None = None  # "A" or "B" for a judge
    verdicts: list[str] | None = None  # the judge's verdicts, A/B as placed by chosen_position


def classifier_pair_score(chosen_reward: float, rejected_reward: float) -> float:
    """1 iff chosen_reward > rejected_reward; a tie counts as wrong, as in reward-bench scripts/run_rm.py."""
    return 1.0 if chosen_reward > rejected_reward else 0.0


def judge_pair_score(verdicts: Sequence[str], chosen_position: str) -> float:
    """Majority verdict of a pair -> 1 (chosen wins), 0 (rejected wins), 0.5 (tie, unparseable, split vote).

    ``verdicts`` use the labels of the order where the chosen response sat at ``chosen_position``.
    """
    if chosen_position not in ("A", "B"):
        raise ValueError(f"chosen_position must be 'A' or 'B', got {chosen_position!r}")
    if not verdicts:
        raise ValueError("a pair needs at least one verdict")
    rejected_position = "B" if chosen_position == "A" else "A"
    counts = Counter(
        "chosen" if v == chosen_position else "rejected" if v == rejected_position else "neither"
        for v in verdicts
    )
    (winner, top), *rest = counts.most_common()
    if rest and rest[0][1] == top:
        return 0.5
    return {"chosen": 1.0, "rejected": 0.0, "neither": 0.5}[winner]


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


# ------------------------------------------------------------------------------------------ aggregation


def subset_accuracies(results: Sequence[PairResult]) -> dict[str, float]:
    """Mean pair score per subset: num_correct / num_total (ties and unparseable verdicts add 0.5)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for result in results:
        scores[result.subset].append(result.score)
    return {subset: sum(values) / len(values) for subset, values in sorted(scores.items())}


def section_scores(
    accuracies: dict[str, float],
    example_counts: dict[str, int] = EXAMPLE_COUNTS,
    sections: dict[str, Sequence[str]] = SECTIONS,
) -> dict[str, float]:
    """Per section, its subsets' accuracies weighted by the benchmark's prompt counts:

        section = sum_s count_s * acc_s / sum_s count_s   over the section's subsets s that were evaluated

    (reward-bench rewardbench/utils.py::calculate_scores_per_section). A section with no evaluated subset is
    left out rather than scored 0.
    """
    scores = {}
    for section, subsets in sections.items():
        present = [s for s in subsets if s in accuracies]
        if present:
            total = sum(example_counts[s] for s in present)
            scores[section] = sum(accuracies[s] * example_counts[s] for s in present) / total
    return scores


def overall_score(sections: dict[str, float]) -> float:
    """Plain mean of the section scores (the RewardBench leaderboard's average)."""
    if not sections:
        raise ValueError("no RewardBench section was evaluated: the data has none of its subsets")
    return sum(sections.values()) / len(sections)


def summarize(results: Sequence[PairResult]) -> dict:
    """Per-subset accuracies and pair counts, section scores, the overall score and what is missing."""
    accuracies = subset_accuracies(results)
    counts = Counter(r.subset for r in results)
    sections = section_scores(accuracies)
    known = {s for subsets in SECTIONS.values() for s in subsets}
    return {
        "overall": overall_score(sections) if sections else None,
        "sections": sections,
        "missing_sections": [s for s in SECTIONS if s not in sections],
        "subsets": {
            s: {"accuracy": accuracies[s], "pairs": counts[s], "weight": EXAMPLE_COUNTS.get(s)}
            for s in accuracies
        },
        "unknown_subsets": sorted(s for s in accuracies if s not in known),
        "pairs": len(results),
    }


# ------------------------------------------------------------------------------------------------ config


class JudgeConfig(BaseModel):
    """A generative judge from ``rewards.judge``: a local transformers model or an OpenAI-compatible server."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hf", "openai"]
    model: str = Field(description="hf: path of a local model directory; openai: the served model's name")
    base_url: str | None = Field(
        default=None, description="openai: server URL, e.g. http://127.0.0.1:8000/v1"
    )
    api_key_env: str | None = Field(default=None, description="openai: environment variable holding the key")
    votes: int = Field(default=1, ge=1, description="samples per order; the majority verdict decides")
    both_orders: bool = Field(default=True, description="also ask with A and B swapped (position bias)")
    template: str | None = Field(
        default=None, description="prompt with {prompt}, {response_a}, {response_b}; None: rewards' default"
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
    from rewards.judge import OpenAIChatGenerator, PairwiseJudge, TransformersGenerator

    if config.kind == "hf":
        generate = TransformersGenerator(
            config.model,
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
    return PairwiseJudge(
        generate, template=config.template, votes=config.votes, both_orders=config.both_orders
    )


def run_rewardbench(config: RewardBenchConfig) -> dict:
    """Scores the pairs, writes results.json, verdicts.jsonl and one bar chart per section to
    ``config.output_dir``, prints the table, and returns the results dictionary."""
    from posttrain.evals.report import write_report

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
        summary["verdict_counts"] = dict(Counter(v for result in results for v in result.verdicts))
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
