"""A real pretrained model end to end, bounded for CI: SmolLM2-135M-Instruct named by its packaged GGUF file,
converted (once per session, shared with tests/model/test_gguf.py), then two GRPO steps with vLLM rollouts."""

from __future__ import annotations

import pytest

from posttrain.model.gguf import SMOLLM2_GGUF, resolve_model_path

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_grpo_with_vllm_on_smollm2_from_its_gguf_file(
    two_grpo_steps, repo_root, posttrain_cache, monkeypatch
):
    pytest.importorskip("vllm")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(posttrain_cache))  # the session's conversion, not a second one
    converted = sorted((posttrain_cache / "gguf").iterdir())
    model_dir, steps = two_grpo_steps(
        model={"path": SMOLLM2_GGUF, "mtp": {"enabled": False}},
        train=repo_root / "data/arith_hard/rl.jsonl",
        generation={
            "backend": "vllm",
            "max_tokens": 16,
            "temperature": 1.0,
            "stop": ["<|im_end|>"],
            # No torch.compile warm-up (two minutes on 2 cores) and a KV cache sized for these prompts.
            "options": {"enforce_eager": True, "max_model_len": 1024},
        },
        rewards=[{"name": "math_accuracy"}, {"name": "r1_format", "weight": 0.2}],
        grpo={"prompts_per_step": 2, "num_generations": 2, "micro_batch_size": 4},
        lr=1e-6,
    )

    assert sorted((posttrain_cache / "gguf").iterdir()) == converted
    assert resolve_model_path(SMOLLM2_GGUF) == str(converted[0])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "chat_template.jinja").is_file()
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        # vLLM samples in float32 from the trainer's weights: its log-probs match the trainer's (5e-6 measured).
        assert row["gap/mean_abs"] < 1e-4 and row["gap/max_abs"] < 1e-3, row
        assert row["completion_length/mean"] > 0 and "reward/math_accuracy" in row and row["time/step_s"] > 0
