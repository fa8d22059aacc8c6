"""Rewards for GRPO and rejection sampling: verifiable (math, format, code) and generative (LLM judges).

A reward is a plain function ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's shape).
Recipes name rewards by registered name, entry point (group ``posttrain.rewards``) or import path;
``RewardRunner`` scores a batch with several of them in warm worker processes, with a hard time bound.
"""

from rewards.code import code_pass, code_pass_fraction
from rewards.format import (
    cosine_length,
    dapo_overlong,
    length_penalty,
    r1_format,
    repetition_penalty,
    tag_count,
)
from rewards.judge import (
    OpenAIChatGenerator,
    PairwiseJudge,
    PointwiseJudge,
    TextGenerator,
    TransformersGenerator,
    parse_pairwise_verdict,
    parse_pointwise_score,
)
from rewards.math import math_accuracy
from rewards.pool import BoundedPool
from rewards.registry import ENTRY_POINT_GROUP, available, get, register
from rewards.runner import RewardFailure, RewardRunner, RewardScores, RewardSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "BoundedPool",
    "OpenAIChatGenerator",
    "PairwiseJudge",
    "PointwiseJudge",
    "RewardFailure",
    "RewardRunner",
    "RewardScores",
    "RewardSpec",
    "TextGenerator",
    "TransformersGenerator",
    "available",
    "code_pass",
    "code_pass_fraction",
    "cosine_length",
    "dapo_overlong",
    "get",
    "length_penalty",
    "math_accuracy",
    "parse_pairwise_verdict",
    "parse_pointwise_score",
    "r1_format",
    "register",
    "repetition_penalty",
    "tag_count",
]
