"""DeepSeekMoE: routing against a float64 reference, bias only in selection, grouped GEMMs, balancing."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tiny_deepseek import tiny_config

from posttrain.model import update_expert_bias
from posttrain.model.moe import (
    DeepSeekMoE,
    MoEGate,
    expert_loop_linear,
    grouped_linear,
    sequence_balance_loss,
)


def _moe(**overrides):
    config = tiny_config(**overrides)
    moe = DeepSeekMoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def _reference_routing(x, weight, bias, cfg):
    """Report Eq. 13-16 with group-limited selection, one token at a time, in float64."""
    per_group = cfg.n_routed_experts // cfg.n_group
    gates, chosen = [], []
    for token in x.double():
        s = [1 / (1 + math.exp(-float(token @ w))) for w in weight.double()]
        biased = [si + float(bi) for si, bi in zip(s, bias, strict=True)]
        groups = [sorted(biased[g * per_group : (g + 1) * per_group])[-2:] for g in range(cfg.n_group)]
        best_groups = sorted(range(cfg.n_group), key=lambda g: -sum(groups[g]))[: cfg.topk_group]
        allowed = [e for e in range(cfg.n_routed_experts) if e // per_group in best_groups]
        top = sorted(allowed, key=lambda e: -biased[e])[: cfg.num_experts_per_tok]
        total = sum(s[e] for e in top)
        chosen.append(sorted(top))
        gates.append({e: s[e] / total * cfg.routed_scaling_factor for e in top})
    return chosen, gates


def test_group_limited_routing_matches_float64_reference():
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    gate = MoEGate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(64, cfg.hidden_size)
    values, indices, _ = gate(x)
    chosen, gates = _reference_routing(x, gate.weight.detach(), gate.e_score_correction_bias, cfg)
    for t in range(64):
        assert sorted(indices[t].tolist()) == chosen[t]
        for slot, e in enumerate(indices[t].tolist()):
            assert values[t, slot].item() == pytest.approx(gates[t][e], abs=1e-5)
        per_group = 16 // 4
        assert len({e // per_group for e in chosen[t]}) <= cfg.topk_group


def test_bias_changes_selection_but_never_the_gate_values():
    cfg = tiny_config()
    gate = MoEGate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(200, cfg.hidden_size)
    values_before, chosen_before, scores = gate(x)
    gate.e_score_correction_bias[5] = 10.0  # expert 5 now wins every selection
    values_after, chosen_after, _ = gate(x)
    assert (chosen_after == 5).any(dim=1).all() and not (chosen_before == 5).any(dim=1).all()
    # Gate values are the *unbiased* affinities of the selected experts, normalised and scaled.
    picked = scores.gather(1, chosen_after)
    expected = picked / picked.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    assert torch.allclose(values_after, expected, atol=1e-6)
    same = (chosen_after.sort(-1).values == chosen_before.sort(-1).values).all(-1)
    assert not same.all()


def test_grouped_gemm_equals_per_expert_loop_forward_and_backward():
    counts = torch.tensor([5, 0, 3, 9, 0, 1])
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(6, 24, 16, requires_grad=True)
    out = grouped_linear(x, w, offsets)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    ref = expert_loop_linear(x, w, offsets)
    rx, rw = torch.autograd.grad(ref, (x, w), grad)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)


def test_moe_layer_equals_dense_per_token_computation():
    moe = _moe().eval()
    x = torch.randn(2, 11, moe.config.hidden_size)
    out, _ = moe(x)
    gates, indices, _ = moe.gate(x.reshape(-1, x.shape[-1]))
    flat = x.reshape(-1, x.shape[-1]).double()
    expected = []
    for t in range(flat.shape[0]):
        y = moe.shared_experts.double()(flat[t])
        for slot in range(indices.shape[1]):
            e = indices[t, slot]
            gate, up = (moe.experts.gate_up_proj[e].double() @ flat[t]).chunk(2)
            y = y + gates[t, slot].double() * (moe.experts.down_proj[e].double() @ (F.silu(gate) * up))
        expected.append(y)
    assert torch.allclose(out.reshape(-1, x.shape[-1]).double(), torch.stack(expected), atol=1e-5)


def test_sequence_balance_loss_matches_equations_17_to_20():
    scores = torch.rand(20, 8, dtype=torch.float64)
    indices = scores.topk(2, dim=-1).indices
    # Two packed rows of 10 tokens: 2 and 3 samples, the same sample id in both rows names different sequences.
    sample_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]])
    loss = sequence_balance_loss(scores, indices, sample_ids, top_k=2, alpha=0.1)
    per_sequence = []
    for rows in (range(0, 4), range(4, 10), range(10, 13), range(13, 15), range(15, 20)):
        n = len(rows)
        f = [8 / (2 * n) * sum(int(e in indices[t].tolist()) for t in rows) for e in range(8)]
        p = [sum(float(scores[t, e] / scores[t].sum()) for t in rows) / n for e in range(8)]
        per_sequence.append(0.1 * sum(fi * pi for fi, pi in zip(f, p, strict=True)))
    assert loss.item() == pytest.approx(sum(per_sequence) / 5, rel=1e-9)


def _skewed_router(seed):
    """Tokens share a direction that experts 0-2 are aligned with: unbalanced, they take ~all top-2 slots."""
    torch.manual_seed(seed)
    moe = _moe(aux_loss_alpha=0.01, n_group=1, topk_group=1)
    direction = torch.randn(moe.config.hidden_size)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.1)
        moe.gate.weight[:3] += direction / direction.norm() * 0.5
    return moe.train(), direction


def _batch(direction, tokens=256):
    return torch.randn(1, tokens, direction.numel()) * 0.5 + direction


def _max_over_mean(moe, direction):
    _, indices, _ = moe.gate(_batch(direction, 4096)[0])
    load = torch.bincount(indices.flatten(), minlength=moe.config.n_routed_experts).float()
    return float(load.max() / load.mean())


def test_bias_updates_balance_a_skewed_router_without_touching_its_weights():
    moe, direction = _skewed_router(0)
    before, weight = _max_over_mean(moe, direction), moe.gate.weight.detach().clone()
    for _ in range(150):
        moe(_batch(direction))
        update_expert_bias(moe, gamma=0.005)
    aux_free = _max_over_mean(moe, direction)
    assert torch.equal(moe.gate.weight, weight)

    # Comparison: the same router trained by the sequence-wise balance loss alone (alpha = 0.01, SGD), which
    # balances by moving the router's weights, i.e. by interfering with what they learn.
    moe_aux, _ = _skewed_router(0)
    optimizer = torch.optim.SGD(moe_aux.gate.parameters(), lr=1.0)
    for _ in range(150):
        _, aux_loss = moe_aux(_batch(direction))
        optimizer.zero_grad()
        aux_loss.backward()
        optimizer.step()
    aux_loss_run = _max_over_mean(moe_aux, direction)

    assert before > 3.5, before  # 3 experts share ~all 2 x 256 slots: max/mean near 8/2
    assert aux_free < 1.3, (before, aux_free, aux_loss_run)
    assert aux_loss_run < before * 0.8, (before, aux_free, aux_loss_run)
    assert not torch.equal(moe_aux.gate.weight, weight)


def _distributed_update(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    moe = _moe()
    moe.expert_load.copy_(torch.tensor([10, 0, 0, 0, 0, 0, 0, 0]) if rank == 0 else torch.arange(8))
    update_expert_bias(moe, gamma=0.5)
    if rank == 0:
        torch.save(moe.gate.e_score_correction_bias.clone(), result_file)
    dist.destroy_process_group()


def test_bias_update_counts_load_over_all_ranks(tmp_path):
    mp.spawn(_distributed_update, args=(2, str(tmp_path / "init"), str(tmp_path / "bias.pt")), nprocs=2)
    bias = torch.load(tmp_path / "bias.pt")
    total = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 0]) + torch.arange(8.0)  # 10,1,2,...,7, mean 4.75
    assert torch.equal(bias, -0.5 * torch.sign(total - total.mean()))


def test_routing_state_keeps_its_precision_in_a_bf16_model():
    moe = _moe().to(torch.bfloat16)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32 and moe.expert_load.dtype == torch.long
    moe.gate.e_score_correction_bias.fill_(0.5)
    moe.expert_load.copy_(torch.tensor([300, 1, 1, 1, 1, 1, 1, 1]))
    update_expert_bias(moe, gamma=1e-3)
    assert moe.gate.e_score_correction_bias[0].item() == pytest.approx(0.499, abs=1e-7)  # lost in bf16
    moe.train()(torch.randn(1, 5, moe.config.hidden_size, dtype=torch.bfloat16))
    assert moe.expert_load.sum() == 5 * moe.config.num_experts_per_tok


def test_grouped_linear_follows_autocast_like_a_matmul():
    """Under autocast (fp32 master weights, bf16 compute) the experts must run as the bf16 grouped GEMM, like every
    other linear layer, not as float32 (on CUDA that fell back to one matmul per expert)."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(40, 32, generator=g), torch.randn(4, 24, 32, generator=g)
    offsets = torch.tensor([10, 10, 25, 40], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_linear(x, weight, offsets)
        reference = torch.cat(
            [x[a:b] @ weight[e].T for e, (a, b) in enumerate([(0, 10), (10, 10), (10, 25), (25, 40)])]
        )
    assert out.dtype == reference.dtype == torch.bfloat16
    exact = torch.cat(
        [
            x[a:b].double() @ weight[e].double().T
            for e, (a, b) in enumerate([(0, 10), (10, 10), (10, 25), (25, 40)])
        ]
    )
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-2
