"""`train.fp8: true` through the trainers' shared switch (posttrain.trainers.loop.apply_memory_and_speed_switches):
which modules it swaps for FP8Linear on transformers' Qwen2 and on posttrain's DeepSeek-V3, that a tiny SFT step
with it matches the bf16/fp32 step within FP8's rounding, and that the quantised weights are reused between
micro-batches and refreshed after every optimiser step (CPU: the dequantising reference GEMM)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.sft import shifted_targets, token_cross_entropy_sum
from posttrain.config import ModelSection, TrainSection
from posttrain.model.fp8_linear import FP8Linear
from posttrain.policy import build_policy
from posttrain.trainers.loop import apply_memory_and_speed_switches

FP8_ON = TrainSection(fp8=True, compile_blocks=False)
ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = str(ROOT / "data" / "tokenizer")


def _fp8_names(policy: torch.nn.Module) -> set[str]:
    return {name for name, module in policy.model.named_modules() if isinstance(module, FP8Linear)}


def test_fp8_switch_swaps_the_projections_of_qwen2_not_embedding_head_or_norms(tiny_qwen2_config_path):
    policy = build_policy(
        ModelSection(from_config=tiny_qwen2_config_path, tokenizer=TOKENIZER, dtype="float32")
    )
    apply_memory_and_speed_switches(policy, FP8_ON)
    layers = policy.model.config.num_hidden_layers
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    projections += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert _fp8_names(policy) == {f"model.layers.{i}.{p}" for i in range(layers) for p in projections}
    assert type(policy.model.lm_head) is torch.nn.Linear
    assert policy.model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases kept


def test_fp8_switch_on_deepseek_v3_keeps_router_experts_and_head_high_precision():
    policy = build_policy(
        ModelSection(
            from_config=str(ROOT / "recipes" / "models" / "tiny_deepseek_v3.json"),
            tokenizer=TOKENIZER,
            dtype="float32",
        )
    )
    before = {name: p for name, p in policy.named_parameters()}
    apply_memory_and_speed_switches(policy, FP8_ON)
    names = _fp8_names(policy)
    assert names and all(not name.endswith(("gate", "lm_head")) for name in names)
    assert any(".self_attn." in n for n in names) and any(".shared_experts." in n for n in names)
    assert not any(".experts." in n for n in names)  # routed experts are grouped weights, not nn.Linear
    assert {name: p for name, p in policy.named_parameters()} == before  # master weights shared, not copied


def _sft_step(
    policy: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> tuple[float, list[torch.Tensor]]:
    """Σ CE / N over micro-batches, one backward each (gradient accumulation); returns loss and gradients."""
    total = 0.0
    for batch in batches:
        targets = shifted_targets(batch["input_ids"], batch["loss_mask"], batch["position_ids"])
        logits = policy(batch["input_ids"], batch["position_ids"]).logits
        loss_sum, count = token_cross_entropy_sum(logits, targets)
        (loss_sum / count / len(batches)).backward()
        total += float(loss_sum / count) / len(batches)
    return total, [p.grad.clone() for p in policy.parameters()]


def _batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.arange(n) for n in (40, 25, 63)])[None]
    return [
        {
            "input_ids": torch.randint(3, vocab, positions.shape, generator=g),
            "position_ids": positions,
            "loss_mask": torch.ones(positions.shape, dtype=torch.bool),
        }
        for _ in range(2)
    ]


def test_tiny_sft_step_with_fp8_matches_the_high_precision_step(tiny_qwen2_config_path):
    torch.manual_seed(0)
    plain = build_policy(
        ModelSection(from_config=tiny_qwen2_config_path, tokenizer=TOKENIZER, dtype="float32")
    )
    fp8 = copy.deepcopy(plain)
    apply_memory_and_speed_switches(fp8, FP8_ON)
    batches = _batches(plain.model.config.vocab_size)
    loss, grads = _sft_step(plain, batches)
    loss_fp8, grads_fp8 = _sft_step(fp8, batches)
    # e4m3 keeps 3 mantissa bits: each GEMM operand is rounded to ~2^-4 relative, per 128-wide tile; on the loss
    # of a random-init model that is ~1e-4 relative, on each gradient a few percent.
    assert abs(loss_fp8 - loss) / loss < 1e-3
    flat, flat_fp8 = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads_fp8])
    assert float((flat_fp8 - flat).norm() / flat.norm()) < 0.1
    assert torch.nn.functional.cosine_similarity(flat, flat_fp8, dim=0) > 0.995


def test_quantised_weights_are_reused_within_a_step_and_refreshed_after_it(tiny_qwen2_config_path):
    policy = build_policy(
        ModelSection(from_config=tiny_qwen2_config_path, tokenizer=TOKENIZER, dtype="float32")
    )
    apply_memory_and_speed_switches(policy, FP8_ON)
    layer = policy.model.model.layers[0].mlp.up_proj
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, foreach=True)  # no version bump in place
    first = layer._quantized_weight()
    assert layer._quantized_weight()[0] is first[0]  # the next micro-batch reuses it
    policy(*(_batches(512)[0][k] for k in ("input_ids", "position_ids"))).logits.sum().backward()
    optimizer.step()
    refreshed = layer._quantized_weight()
    assert refreshed[0] is not first[0]
    with torch.no_grad():
        layer.weight.mul_(
            2.0
        )  # an in-place edit outside the optimiser (load_state_dict does this) bumps the version
    assert layer._quantized_weight()[0] is not refreshed[0]


def test_sft_trainer_with_fp8_follows_the_plain_run_and_saves_plain_weights(tmp_path):
    """`train.fp8: true` end to end through the SFT trainer (2 steps): the losses follow the high-precision run's
    and the saved model has the same tensors as a plain one (master weights, loadable by transformers)."""
    import json

    import yaml
    from safetensors.torch import load_file

    from posttrain.config import SFTRecipe, load_recipe
    from posttrain.trainers.sft import train_sft

    rows = (ROOT / "data" / "arith" / "sft.jsonl").read_text().splitlines()[:24]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    saved, losses = {}, {}
    for name, fp8 in (("plain", False), ("fp8", True)):
        recipe = {
            "model": {
                "from_config": str(ROOT / "recipes" / "models" / "tiny_qwen2.json"),
                "tokenizer": TOKENIZER,
                "mtp": {"attach_depth": 0},
            },
            "data": {"train": [str(data)], "max_seq_len": 256},
            "packing": {"capacity": 256},
            "train": {
                "lr": 1e-3,
                "min_lr": 1e-4,
                "seed": 1,
                "max_steps": 2,
                "micro_batch_size": 2,
                "fp8": fp8,
            },
            "logging": {"tensorboard": False, "progress": False},
            "output_dir": str(tmp_path / name),
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        model_dir = train_sft(load_recipe(path, SFTRecipe))
        saved[name] = load_file(str(model_dir / "model.safetensors"))
        metrics = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in metrics if "loss" in json.loads(line)]
    assert saved["fp8"].keys() == saved["plain"].keys()
    assert all(saved["fp8"][k].dtype == saved["plain"][k].dtype for k in saved["plain"])
    assert len(losses["fp8"]) == len(losses["plain"]) == 2
    assert losses["fp8"] == pytest.approx(losses["plain"], rel=2e-3)


def test_compiled_blocks_with_fp8_trace_whole_and_train_like_eager_fp8(tiny_qwen2_config_path, monkeypatch):
    """`train.fp8` with `train.compile_blocks`: FP8Linear is traced into each block's graph (the activations'
    quantisation one operator, the GEMMs another), with no graph break and one graph for packs of every length.
    The weights are quantised outside the graph, once per optimiser step, by each block's pre-hook: training
    steps (AdamW in place, which bumps no version counter) give the logits and gradients of the same FP8 model run
    eagerly, so no stale copy is read. The "aot_eager" backend runs the trace of dynamo and AOTAutograd without
    Inductor's compile time; Inductor's code is checked on a GPU by bench/fp8_block_gpu.py."""
    from torch._dynamo.utils import counters

    from posttrain.fast.backbone import compile_decoder_layers, decoder_layers
    from posttrain.model import fp8_linear

    eager_quantize = fp8_linear.quantize_blocks_both_layouts

    def outside_graphs_only(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if torch.compiler.is_compiling():
            raise AssertionError("a weight was quantised inside the compiled graph")
        return eager_quantize(*args, **kwargs)

    monkeypatch.setattr(fp8_linear, "quantize_blocks_both_layouts", outside_graphs_only)
    torch.manual_seed(0)
    compiled = build_policy(
        ModelSection(from_config=tiny_qwen2_config_path, tokenizer=TOKENIZER, dtype="float32")
    )
    apply_memory_and_speed_switches(compiled, FP8_ON)
    eager = copy.deepcopy(compiled)
    optimizers = [torch.optim.AdamW(p.parameters(), lr=1e-2, foreach=True) for p in (compiled, eager)]
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(compiled.model, backend="aot_eager")
    for layer in decoder_layers(compiled.model):  # as apply_memory_and_speed_switches does
        assert fp8_linear.refresh_quantized_weights_before(layer) == 7
    for lengths in ([20, 13], [7, 30, 9, 11], [48, 2]):
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        input_ids = torch.randint(
            3, 512, positions.shape, generator=torch.Generator().manual_seed(len(lengths))
        )
        results = []
        for policy, optimizer in zip((compiled, eager), optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            logits = policy(input_ids, positions).logits
            logits.logsumexp(-1).mean().backward()
            results.append((logits.detach(), [p.grad.clone() for p in policy.parameters()]))
            optimizer.step()
        (got, got_grads), (want, want_grads) = results
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_the_speed_switch_compiles_fp8_blocks_with_their_weights_refreshed_outside_the_graph(
    tiny_qwen2_config_path,
):
    policy = build_policy(
        ModelSection(from_config=tiny_qwen2_config_path, tokenizer=TOKENIZER, dtype="float32")
    )
    apply_memory_and_speed_switches(policy, TrainSection(fp8=True, compile_blocks=True))
    fp8_layers = [m for m in policy.model.modules() if isinstance(m, FP8Linear)]
    assert fp8_layers and all(m.__dict__.get("refreshed_before_compiled_calls") for m in fp8_layers)
