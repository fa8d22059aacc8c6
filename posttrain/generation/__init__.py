"""Rollout backends behind one interface: transformers (`hf`), in-process vLLM (`vllm`), a server (`openai`)."""

from posttrain.generation.base import Backend, Completion, SamplingParams
from posttrain.generation.factory import build_backend

__all__ = ["Backend", "Completion", "SamplingParams", "build_backend"]
