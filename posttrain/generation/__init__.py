"""Rollout backends behind one interface: transformers (`hf`), in-process vLLM (`vllm`), a server (`openai`)."""

from posttrain.generation.base import Backend, Completion, SamplingParams, build_backend

__all__ = ["Backend", "Completion", "SamplingParams", "build_backend"]
