"""GRPO pieces against float64 hand computations, and the GRPO gradient against REINFORCE."""

import math

import pytest
import torch

from posttrain.algorithms.grpo import (
    GRPOLossConfig,
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    log_importance_ratio,
    mask_truncated_completions,
    zero_variance_groups,
)

f64 = torch.float64
EPS = 1e-4


def t(values, dtype=f64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- advantages


def test_group_advantages_group_scale_hand_values():
    # group 1: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1; group 2: mean 1, std sqrt((1 + 1 + 4) / 2) = √3
    adv, valid = group_advantages(t([1.0, 2.0, 3.0, 0.0, 0.0, 3.0]), group_size=3)
    s3 = math.sqrt(3) + EPS
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -1 / s3, -1 / s3, 2 / s3]
    torch.testing.assert_close(adv, t(expected), rtol=0, atol=1e-15)
    assert valid.all()


def test_group_advantages_batch_and_none_scale_hand_values():
    rewards = t([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    centered = t([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])
    # batch std over all six rewards: mean 1.5, Σ(r − 1.5)² = 9.5, Bessel: 9.5 / 5 = 1.9
    adv, _ = group_advantages(rewards, group_size=3, scale="batch")
    torch.testing.assert_close(adv, centered / (math.sqrt(1.9) + EPS), rtol=0, atol=1e-15)
    adv, _ = group_advantages(rewards, group_size=3, scale="none")
    torch.testing.assert_close(adv, centered, rtol=0, atol=0)


def test_group_advantages_nan_reward_is_excluded_not_zero():
    nan = float("nan")
    rewards = t([1.0, nan, 3.0, nan, nan, nan, nan, 5.0, nan])
    adv, valid = group_advantages(rewards, group_size=3)
    # group 1 statistics over {1, 3}: mean 2 (a reward of 0 would give 4/3), std √2
    s2 = math.sqrt(2) + EPS
    torch.testing.assert_close(adv, t([-1 / s2, 0, 1 / s2, 0, 0, 0, 0, 0, 0]), rtol=0, atol=1e-15)
    assert valid.tolist() == [True, False, True, False, False, False, False, True, False]
    assert not adv.isnan().any()


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(t([1.0, 2.0, 3.0]), group_size=4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(t([1.0, 2.0]), group_size=2, scale="global")


def test_zero_variance_groups():
    nan = float("nan")
    rewards = t([1, 1, 1, 0, 1, 0, nan, 2, 2, nan, nan, 7, 1, 1 + 1e-9, 1])
    keep, fraction = zero_variance_groups(rewards, group_size=3)
    assert keep.tolist() == [False, True, False, False, False]
    assert fraction.item() == pytest.approx(0.8)


def test_mask_truncated_completions():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = mask_truncated_completions(mask, torch.tensor([False, True]))
    assert out.tolist() == [[True, True, False], [False, False, False]]
    with pytest.raises(ValueError, match="is_truncated"):
        mask_truncated_completions(mask, torch.tensor([True]))


# ---------------------------------------------------------------- ratio, clipping, KL


def test_clipped_surrogate_hand_values_and_gradients():
    ratios = t([[0.5, 1.1, 1.5], [0.5, 1.1, 4.0]])
    adv = t([1.0, -2.0])
    for delta, last_loss, last_grad in ((None, 8.0, 8.0), (3.0, 6.0, 0.0)):
        log_ratio = ratios.log().requires_grad_()
        loss, stats = clipped_surrogate(log_ratio, adv, epsilon_low=0.2, epsilon_high=0.28, delta=delta)
        # A=+1: −min(r, clip(r, .8, 1.28)) = −[0.5, 1.1, 1.28]; A=−2: −min(−2r, −2 clip(r)) = [1.6, 2.2, 8],
        # and the dual clip bounds the last one at −δA = 6
        torch.testing.assert_close(loss, t([[-0.5, -1.1, -1.28], [1.6, 2.2, last_loss]]), rtol=0, atol=1e-15)
        (grad,) = torch.autograd.grad(loss.sum(), log_ratio)
        # d/dlogρ of −ρA = −ρA where unclipped, 0 where a clip holds
        torch.testing.assert_close(grad, t([[-0.5, -1.1, 0.0], [0.0, 2.2, last_grad]]), rtol=0, atol=1e-15)
        assert stats["low"].tolist() == [[False, False, False], [True, False, False]]
        assert stats["high"].tolist() == [[False, False, True], [False, False, False]]
        if delta is not None:
            assert stats["dual"].tolist() == [[False, False, False], [False, False, True]]
    with pytest.raises(ValueError, match="delta"):
        clipped_surrogate(ratios.log(), adv, 0.2, 0.28, delta=1.2)


def test_sequence_level_ratio_hand_values():
    logps = t([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    old = t([[-1.2, -1.6, 9.0], [-0.5, -0.8, -0.2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: (0.2 − 0.4) / 2 = −0.1; row 1: (0 + 0.3 − 0.3) / 3 = 0
    log_ratio = log_importance_ratio(logps, old, mask, "sequence")
    torch.testing.assert_close(log_ratio, t([[-0.1, -0.1, -0.1], [0.0, 0.0, 0.0]]), rtol=0, atol=1e-15)
    torch.testing.assert_close(log_importance_ratio(logps, old, mask, "token"), logps - old, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gspo_token_form_gradient_equals_sequence_form(loss_type):
    """GSPO Eq. 7 written directly per sequence (ratio s_i, clipped per sequence) vs our token form."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    old = -torch.rand(4, 4, dtype=f64) * 2
    shifts = t([[0.1, 0.05, 0.0, 0], [-0.3, -0.2, 0, 0], [0.5, 0.4, 0.3, 0.6], [0.01, 0, 0, 0]])
    adv = t([1.0, -1.0, 1.0, -0.5])  # rows 1 and 2 have sequence ratios outside [0.8, 1.2]
    config = GRPOLossConfig(
        loss_type=loss_type, importance_sampling_level="sequence", max_completion_length=4
    )
    logps = (old + shifts).requires_grad_()
    loss, _ = grpo_loss(logps, adv, mask, config, old_logps=old)
    (grad,) = torch.autograd.grad(loss, logps)

    logps_ref = (old + shifts).requires_grad_()
    lengths = mask.sum(-1).to(f64)
    s = torch.exp(((logps_ref - old) * mask).sum(-1) / lengths)
    per_sequence = -torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv)
    weight = {"grpo": 1 / 4, "dapo": lengths / lengths.sum(), "dr_grpo": lengths / (4 * 4)}[loss_type]
    (grad_ref,) = torch.autograd.grad((per_sequence * weight).sum(), logps_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-14)
    assert grad[1].abs().sum() == 0 and grad[2].abs().sum() == 0  # clipped as whole sequences
    torch.testing.assert_close(loss, (per_sequence * weight).sum(), rtol=0, atol=1e-14)


def test_k3_kl_hand_value():
    logps = t([math.log(0.5), math.log(0.3)])
    ref = t([math.log(0.25), math.log(0.3)])
    # π_ref/π = 0.5: 0.5 − log 0.5 − 1 = log 2 − 0.5
    torch.testing.assert_close(k3_kl(logps, ref), t([math.log(2) - 0.5, 0.0]), rtol=0, atol=1e-16)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_k3_kl_gradient_in_expectation(bias_correction):
    """Exact expectation over a categorical: E_{y~π_old}[ρ k3] has gradient ∇KL(π‖ref) (DeepSeek-V3.2),
    plain E[k3] has the gradient of KL(ref‖π)."""
    torch.manual_seed(1)
    logits = torch.randn(6, dtype=f64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6, dtype=f64), -1)
    logps = torch.log_softmax(logits, -1)
    config = GRPOLossConfig(beta=1.0, loss_type="grpo", use_bias_correction_kl=bias_correction)
    probs = logps.detach().exp()
    # one single-token completion per vocabulary entry y, weighted by its probability under π_old = sg[π]
    expectation = sum(
        probs[y]
        * grpo_loss(
            logps[y : y + 1, None],
            torch.zeros(1, dtype=f64),
            torch.ones(1, 1, dtype=torch.bool),
            config,
            ref_logps=ref[y : y + 1, None],
        )[0]
        for y in range(6)
    )
    (grad,) = torch.autograd.grad(expectation, logits)
    p = torch.softmax(logits, -1)
    target = (p * (p.log() - ref)).sum() if bias_correction else (ref.exp() * (ref - p.log())).sum()
    (grad_ref,) = torch.autograd.grad(target, logits)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-14)
    assert (k3_kl(logps, ref) >= 0).all()


# ---------------------------------------------------------------- aggregation


def test_aggregate_loss_hand_values():
    loss = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(loss, mask, "grpo").item() == pytest.approx((1.5 + 4.0) / 2, abs=1e-15)
    assert aggregate_loss(loss, mask, "dapo").item() == pytest.approx(7 / 3, abs=1e-15)
    assert aggregate_loss(loss, mask, "token_mean").item() == pytest.approx(7 / 3, abs=1e-15)
    assert aggregate_loss(loss, mask, "dr_grpo", max_completion_length=4).item() == pytest.approx(
        7 / 8, abs=1e-15
    )
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(loss, mask, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(loss, mask, "bnpo")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_aggregate_loss_micro_batches_sum_to_full_batch(loss_type):
    torch.manual_seed(2)
    loss = torch.randn(6, 5, dtype=f64)
    mask = torch.rand(6, 5) < 0.7
    full = aggregate_loss(loss, mask, loss_type, max_completion_length=5)
    parts = [
        aggregate_loss(loss[rows], mask[rows], loss_type, mask.sum(), 6, max_completion_length=5)
        for rows in (slice(0, 1), slice(1, 4), slice(4, 6))
    ]
    torch.testing.assert_close(sum(parts), full, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- composition


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_gradient_equals_reinforce_with_group_baseline(loss_type, level):
    """μ = 1 (π_old = sg[π_θ]), β = 0, no clip active: ∇L_GRPO = −Σ_{i,t} c_{i,t} A_i ∇log π_θ(o_{i,t}),
    with c the aggregation weight (1/(B|o_i|), 1/N_tok or 1/(B L_max))."""
    torch.manual_seed(3)
    batch, length, features, vocab, group = 6, 5, 4, 7, 3
    weight = torch.randn(features, vocab, dtype=f64, requires_grad=True)
    states = torch.randn(batch, length, features, dtype=f64)
    with torch.no_grad():
        actions = torch.distributions.Categorical(logits=states @ weight).sample()
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = t([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    advantages, _ = group_advantages(rewards, group)

    def logps_of(w):
        return torch.log_softmax(states @ w, -1).gather(-1, actions[..., None]).squeeze(-1)

    config = GRPOLossConfig(
        loss_type=loss_type, importance_sampling_level=level, max_completion_length=length
    )
    loss, metrics = grpo_loss(logps_of(weight), advantages, mask, config)
    (grad,) = torch.autograd.grad(loss, weight)
    assert metrics["clip_ratio/region_mean"].item() == 0.0

    per_sequence = {
        "grpo": 1 / (batch * lengths.to(f64)),
        "dapo": torch.full((batch,), 1 / lengths.sum().item(), dtype=f64),
        "dr_grpo": torch.full((batch,), 1 / (batch * length), dtype=f64),
    }[loss_type]
    logps = logps_of(weight)
    reinforce = -(per_sequence[:, None] * advantages[:, None] * torch.where(mask, logps, 0.0)).sum()
    (grad_ref,) = torch.autograd.grad(reinforce, weight)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-14)
    assert grad.abs().max() > 1e-3  # the comparison is not between zeros


def test_grpo_loss_masks_nan_rewards_and_truncated_completions():
    torch.manual_seed(4)
    nan = float("nan")
    advantages, valid = group_advantages(t([1.0, nan, 0.0, 2.0]), group_size=2)
    logps = (-torch.rand(4, 3, dtype=f64)).requires_grad_()
    mask = torch.ones(4, 3, dtype=torch.bool)
    truncated = torch.tensor([False, False, False, True])
    config = GRPOLossConfig(mask_truncated_completions=True)
    loss, metrics = grpo_loss(logps, advantages, mask, config, reward_valid=valid, is_truncated=truncated)
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad[1].abs().sum() == 0 and grad[3].abs().sum() == 0
    assert metrics["loss_tokens"].item() == 6
    # rows 0 and 2 remain: dapo = Σ −A_i ρ over their 6 tokens / 6, ρ = 1
    expected = -(advantages[0] * 3 + advantages[2] * 3) / 6
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="is_truncated"):
        grpo_loss(logps, advantages, mask, config)


def test_grpo_loss_with_kl_hand_value():
    logps = t([[math.log(0.5), 0.0]]).requires_grad_()
    ref = t([[math.log(0.25), 0.0]])
    mask = torch.tensor([[True, False]])
    config = GRPOLossConfig(beta=0.1)
    loss, metrics = grpo_loss(logps, t([2.0]), mask, config, ref_logps=ref)
    # −ρA + β k3 with ρ = 1: −2 + 0.1 (log 2 − 0.5)
    assert loss.item() == pytest.approx(-2 + 0.1 * (math.log(2) - 0.5), abs=1e-15)
    assert metrics["kl"].item() == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, t([2.0]), mask, config)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLossConfig(loss_type="bnpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="delta"):
        GRPOLossConfig(delta=1.1)
    with pytest.raises(ValueError, match="tis_cap"):
        GRPOLossConfig(tis_cap=0.0)
    assert GRPOLossConfig(epsilon=0.2).epsilon_high_value == 0.2
