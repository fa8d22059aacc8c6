"""MTP: packed samples behave as if run alone (main and MTP logits), the loss, training, and attach_mtp."""

import pytest
import torch
import torch.nn.functional as F
from tiny_deepseek import tiny_config
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.model import DeepseekV3ForCausalLM, attach_mtp, mtp_loss

SAMPLES = [7, 5, 9]  # packed into one row of 21 tokens


def _packed(lengths):
    ids = torch.randint(0, 96, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return ids, position_ids, starts


def test_packed_samples_give_the_logits_of_each_sample_alone():
    model = DeepseekV3ForCausalLM(tiny_config(num_nextn_predict_layers=2)).eval()
    ids, position_ids, starts = _packed(SAMPLES)
    with torch.no_grad():
        packed = model(ids, position_ids=position_ids, return_mtp=True)
    assert [m.shape[1] for m in packed.mtp_logits] == [20, 19]
    for start, n in zip(starts, SAMPLES, strict=True):
        with torch.no_grad():
            alone = model(ids[:, start : start + n], return_mtp=True)
        assert (packed.logits[:, start : start + n] - alone.logits).abs().max() <= 1e-5
        for k, (mtp_packed, mtp_alone) in enumerate(zip(packed.mtp_logits, alone.mtp_logits, strict=True), 1):
            # Position i of depth k predicts token i+1+k: only i + k < n stay inside the sample.
            assert mtp_alone.shape[1] == n - k
            assert (mtp_packed[:, start : start + n - k] - mtp_alone).abs().max() <= 1e-5


def test_mtp_module_k_reads_the_token_k_ahead_and_nothing_later():
    model = DeepseekV3ForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 96, (1, 12))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 96
    with torch.no_grad():
        a, b = model(ids, return_mtp=True), model(changed, return_mtp=True)
    # Not bit-exact: the grouped expert GEMM's blocking depends on how many rows each expert gets, and changing
    # t_6 re-routes later tokens. Rounding stays below 1e-5; reading t_6 moves a logit by far more.
    delta = (a.mtp_logits[0] - b.mtp_logits[0]).abs().amax(-1)[0]
    assert delta[:5].max() < 1e-5 and delta[5] > 1e-3  # position 5 embeds t_6; earlier positions never see it
    main_delta = (a.logits - b.logits).abs().amax(-1)[0]
    assert main_delta[:6].max() < 1e-5 and main_delta[6] > 1e-3


def test_mtp_loss_drops_targets_across_sample_boundaries():
    logits = [torch.randn(1, 7, 5, dtype=torch.float64)]
    labels = torch.tensor([[1, 2, 3, -100, 0, 4, 2, -100]])  # two samples of 4 tokens, labels shifted
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    got = mtp_loss(logits, labels, position_ids, weight=0.5)
    # depth 1: position i predicts labels[i+1] if it is in the same sample: i = 0, 1 (sample 1), 4, 5 (sample 2)
    valid = [(0, 2), (1, 3), (4, 4), (5, 2)]
    expected = sum(F.cross_entropy(logits[0][0, i], torch.tensor(t)) for i, t in valid) / len(valid)
    assert got.item() == pytest.approx(0.5 * expected.item(), rel=1e-6)  # the loss is taken in float32


def test_tiny_model_learns_with_mtp_and_balancing():
    model = DeepseekV3ForCausalLM(tiny_config(aux_loss_alpha=1e-3)).train()
    ids, position_ids, _ = _packed([12, 9, 11])
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    labels[position_ids.roll(-1, dims=1) == 0] = -100  # the last token of each sample has no target
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        out = model(ids, position_ids=position_ids, return_mtp=True)
        main = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        extra = mtp_loss(out.mtp_logits, labels, position_ids, weight=1.0)
        loss = main + extra + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        if not history:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert no_grad == [], no_grad
        optimizer.step()
        model.update_routing_bias()
        history.append((main.item(), extra.item()))
    assert history[-1][0] < 0.3 * history[0][0] and history[-1][1] < 0.5 * history[0][1], history[::10]


@pytest.fixture
def qwen2(tiny_qwen2_config_path):
    config = Qwen2Config.from_json_file(tiny_qwen2_config_path)
    config.num_hidden_layers = 2
    config.initializer_range = 0.1
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attached_mtp_respects_packing(qwen2, attention):
    qwen2.config._attn_implementation = attention
    mtp = attach_mtp(qwen2, depth=2).eval()
    ids, position_ids, starts = _packed(SAMPLES)
    with torch.no_grad():
        hidden = qwen2.model(ids, position_ids=position_ids, use_cache=False).last_hidden_state
        packed = mtp(hidden, ids, position_ids)
        for start, n in zip(starts, SAMPLES, strict=True):
            alone_ids = ids[:, start : start + n]
            alone = mtp(qwen2.model(alone_ids).last_hidden_state, alone_ids)
            for k in (1, 2):
                assert (packed[k - 1][:, start : start + n - k] - alone[k - 1]).abs().max() <= 1e-5


def test_attached_mtp_shares_embedding_and_head_and_round_trips(qwen2, tmp_path):
    mtp = attach_mtp(qwen2, depth=1)
    assert not any("embed" in k or "lm_head" in k for k in mtp.state_dict())
    ids = torch.randint(0, 512, (2, 10))
    hidden = qwen2.model(ids).last_hidden_state
    mtp(hidden, ids)[0].sum().backward()
    assert qwen2.model.embed_tokens.weight.grad is not None  # gradients reach the shared embedding/head

    with torch.no_grad():
        torch.nn.init.normal_(mtp.layers[0].eh_proj.weight)
        expected = mtp(hidden, ids)[0]
    mtp.save_pretrained(tmp_path)
    loaded = attach_mtp(qwen2, path=tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(hidden, ids)[0], expected)

    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "mtp.safetensors")
    state["layers.0.extra.weight"] = state.pop("layers.0.hnorm.weight")
    save_file(state, tmp_path / "mtp.safetensors")
    with pytest.raises(KeyError, match=r"missing keys \['layers.0.hnorm.weight'\].*layers.0.extra.weight"):
        attach_mtp(qwen2, path=tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients_and_counts_routing_once():
    config = tiny_config(aux_loss_alpha=1e-2)
    ids, position_ids, _ = _packed(SAMPLES)
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = DeepseekV3ForCausalLM(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(ids, position_ids=position_ids, return_mtp=True)
        (out.logits.square().mean() + out.mtp_logits[0].square().mean() + out.aux_loss).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        loads = torch.stack([m.mlp.expert_load for m in [*model.model.layers[1:], *model.model.mtp_layers]])
        runs.append((grads, loads))
    (plain, plain_loads), (ckpt, ckpt_loads) = runs
    assert torch.equal(plain_loads, ckpt_loads) and plain_loads.sum() > 0
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)
