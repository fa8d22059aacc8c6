"""A deliberately wrong sampler, for measuring what the sampler/trainer gap does to GRPO (issue 10).

Real rollout engines differ from the trainer in kernels, precision and sometimes code (vLLM's DeepSeek-V3 path:
0.16 nats/token, BENCHMARKS.md). To study the effect and its corrections in a controlled way, this backend
samples from a perturbed policy q while the trainer differentiates the clean π (z: the policy's logits):

    temperature_factor f:  q = softmax(z / (f·T))          the sampler runs hotter (f > 1) or colder
    weight_noise σ:        q = π with every weight W replaced by W + σ·rms(W)·ε, ε ~ N(0, I) redrawn at every
                           weight sync (numerical noise that changes from step to step)
    logit_bias_std σ_b:    q = softmax((z + b) / T), b ~ N(0, σ_b²) per vocabulary entry, drawn once: a
                           systematic per-token error, as a mis-quantised output head or a kernel bug makes

The first two are, to first order, re-parametrisations of the same weights: an update that improves q improves
π alike. A fixed logit offset is not: uncorrected GRPO then optimises q = π·e^b, and π inherits −b.

The reported log-probs are those of q, the distribution the tokens really came from (as any honest engine
reports), so the gap log q − log π is what `posttrain.algorithms.rollout_fidelity` measures and corrects.
Evaluation keeps the clean backend: the trainer measures the policy it trains, not its perturbed sampler.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch

from posttrain.generation.base import Backend, Completion, SamplingParams


def add_relative_noise_(module: torch.nn.Module, sigma: float, generator: torch.Generator) -> None:
    """W ← W + σ·rms(W)·ε for every floating-point parameter, in place (ε drawn on the CPU, so seeded runs
    agree across devices)."""
    with torch.no_grad():
        for param in module.parameters():
            if not param.is_floating_point():
                continue
            rms = param.float().pow(2).mean().sqrt()
            noise = torch.randn(param.shape, generator=generator).to(param.device)
            param.add_((sigma * rms * noise).to(param.dtype))


class PerturbedSampler:
    """Wrap a backend so that its rollouts come from a perturbed policy (see the module docstring).

    Temperature alone: the clean backend samples, hotter or colder. Weight noise or a logit bias: a private copy
    of `policy_module` carries them, and `make_backend(copy)` builds the backend that samples from it (the bias
    is added to the output head's logits by a hook, so it reaches backends that run the module: hf, latent).
    """

    def __init__(
        self,
        clean: Backend,
        policy_module: torch.nn.Module,
        make_backend: Callable[[torch.nn.Module], Backend],
        temperature_factor: float = 1.0,
        weight_noise: float = 0.0,
        logit_bias_std: float = 0.0,
        seed: int = 0,
    ) -> None:
        if temperature_factor <= 0:
            raise ValueError(f"temperature_factor must be > 0, got {temperature_factor}")
        if weight_noise < 0 or logit_bias_std < 0:
            raise ValueError(
                f"weight_noise and logit_bias_std must be >= 0, got {weight_noise}, {logit_bias_std}"
            )
        self.clean = clean
        self.temperature_factor = temperature_factor
        self.weight_noise = weight_noise
        self.generator = torch.Generator().manual_seed(seed)
        self.copy = None
        self.inner = clean
        if weight_noise > 0 or logit_bias_std > 0:
            self.copy = copy.deepcopy(policy_module).eval().requires_grad_(False)
            if weight_noise > 0:
                add_relative_noise_(self.copy, weight_noise, self.generator)
            if logit_bias_std > 0:
                head = self.copy.get_output_embeddings()
                bias = torch.randn(head.weight.shape[0], generator=self.generator) * logit_bias_std
                self.logit_bias = bias.to(head.weight.device)
                head.register_forward_hook(
                    lambda module, args, logits: logits + self.logit_bias.to(logits.dtype)
                )
            self.inner = make_backend(self.copy)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if not params.greedy:
            params = dataclasses.replace(params, temperature=params.temperature * self.temperature_factor)
        return self.inner.generate(prompt_ids, params)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The clean backend (used for evaluation) gets `model`; the copy gets `model` plus its perturbation."""
        self.clean.sync_weights(model)
        if self.copy is None:
            return
        self.copy.load_state_dict(model.state_dict())
        if self.weight_noise > 0:
            add_relative_noise_(self.copy, self.weight_noise, self.generator)
        self.inner.sync_weights(self.copy)

    def close(self) -> None:
        """Close the copy's backend; the clean one belongs to the caller."""
        if self.inner is not self.clean:
            self.inner.close()
