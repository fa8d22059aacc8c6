"""Sampler/trainer gap metrics and corrections against hand values; exact no-op when the two agree."""

import math

import pytest
import torch

from posttrain.algorithms.grpo import GRPOLossConfig, grpo_loss
from posttrain.algorithms.rollout_fidelity import (
    logprob_gap_metrics,
    off_policy_sequence_mask,
    sequence_gap_statistics,
    truncated_importance_weights,
)

f64 = torch.float64
# trainer log p and sampler log q of the same tokens; padding (last token of row 0) holds junk on purpose
TRAINER = torch.tensor([[-1.0, -2.0, 5.0], [-0.5, -0.5, -0.5]], dtype=f64)
SAMPLER = torch.tensor([[-1.1, -1.5, -7.0], [-0.5, -0.5, -0.5]], dtype=f64)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
# row 0 gaps δ = log q − log p = [−0.1, +0.5]; row 1: all 0
K3_ROW0 = (math.expm1(0.1) - 0.1) + (math.expm1(-0.5) + 0.5)


def test_sequence_gap_statistics_hand_values():
    stats = sequence_gap_statistics(TRAINER, SAMPLER, MASK)
    expected = {
        "mean_abs_gap": [0.3, 0.0],
        "max_abs_gap": [0.5, 0.0],
        "k1": [0.2, 0.0],
        "k3": [K3_ROW0 / 2, 0.0],
        "seq_kl_k1": [0.4, 0.0],
        "seq_kl_k3": [K3_ROW0, 0.0],
    }
    for name, values in expected.items():
        torch.testing.assert_close(stats[name], torch.tensor(values, dtype=f64), rtol=0, atol=1e-15, msg=name)


def test_logprob_gap_metrics_hand_values():
    metrics = logprob_gap_metrics(TRAINER, SAMPLER, MASK, threshold=0.2)
    assert metrics["gap/mean_abs"].item() == pytest.approx(0.6 / 5, abs=1e-15)
    assert metrics["gap/max_abs"].item() == pytest.approx(0.5, abs=1e-15)
    assert metrics["gap/frac_over_thr"].item() == pytest.approx(1 / 5, abs=1e-15)
    assert metrics["gap/seq_kl_k1"].item() == pytest.approx(0.2, abs=1e-15)
    assert metrics["gap/seq_kl_k3"].item() == pytest.approx(K3_ROW0 / 2, abs=1e-15)


def test_truncated_importance_weights_hand_values():
    weights = truncated_importance_weights(TRAINER, SAMPLER, MASK, cap=1.05)
    # exp(log p − log q) = [e^{0.1} → capped at 1.05, e^{−0.5}], padding 1; row 1 all 1
    expected = torch.tensor([[1.05, math.exp(-0.5), 1.0], [1.0, 1.0, 1.0]], dtype=f64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-15)
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="tis_cap"):
        truncated_importance_weights(TRAINER, SAMPLER, MASK, cap=0.0)


def test_off_policy_sequence_mask():
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.19, "k1").tolist() == [False, True]
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.21, "k1").tolist() == [True, True]
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.49, "max_abs_gap").tolist() == [False, True]
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.29, "mean_abs_gap").tolist() == [False, True]
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.31, "mean_abs_gap").tolist() == [True, True]
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, K3_ROW0 / 2 - 1e-9, "k3").tolist() == [
        False,
        True,
    ]
    # DeepSeek-V3.2 rule: a non-negative advantage is kept whatever the gap
    adv = torch.tensor([0.5, -1.0], dtype=f64)
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.1, "k1", adv).tolist() == [True, True]
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.1, "k1", -adv).tolist() == [False, True]
    assert off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.1, "k1", 0 * adv).tolist() == [True, True]
    with pytest.raises(ValueError, match="off_policy_mask_statistic"):
        off_policy_sequence_mask(TRAINER, SAMPLER, MASK, 0.1, "kl")


def test_grpo_loss_applies_tis_and_off_policy_mask():
    logps = TRAINER.clone().requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=f64)
    # TIS only: per-token loss −A ρ w with ρ = 1, token mean over 5 tokens
    config = GRPOLossConfig(tis_cap=1.05)
    loss, metrics = grpo_loss(logps, adv, MASK, config, sampler_logps=SAMPLER)
    assert loss.item() == pytest.approx(-(1.05 + math.exp(-0.5)) / 5 + 3 / 5, abs=1e-15)
    assert metrics["tis/capped_frac"].item() == pytest.approx(1 / 5, abs=1e-7)  # metrics are float32
    # off-policy mask (k1 of row 0 = 0.2 > 0.1) drops row 0 from the loss and the token count
    config = GRPOLossConfig(tis_cap=None, off_policy_mask_threshold=0.1)
    loss, metrics = grpo_loss(logps, adv, MASK, config, old_logps=TRAINER, sampler_logps=SAMPLER)
    assert loss.item() == pytest.approx(1.0, abs=1e-15)
    assert metrics["off_policy/masked_frac"].item() == 0.5
    assert metrics["loss_tokens"].item() == 3


CONFIGS = [
    GRPOLossConfig(),
    GRPOLossConfig(
        loss_type="grpo", beta=0.04, off_policy_mask_threshold=0.0, off_policy_mask_statistic="k3"
    ),
    GRPOLossConfig(
        loss_type="dr_grpo",
        max_completion_length=6,
        importance_sampling_level="sequence",
        off_policy_mask_threshold=0.0,
        off_policy_mask_statistic="max_abs_gap",
    ),
    GRPOLossConfig(epsilon_high=0.28, delta=3.0, tis_cap=1.0, off_policy_mask_threshold=0.0),
    GRPOLossConfig(off_policy_mask_threshold=0.0, off_policy_mask_statistic="mean_abs_gap"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_sampler_and_trainer_logprobs_are_an_exact_no_op(config, dtype):
    torch.manual_seed(5)
    old = -torch.rand(4, 6, dtype=dtype) * 3
    current = (old + 0.3 * torch.randn(4, 6, dtype=dtype)).requires_grad_()  # μ > 1: some clips are active
    ref = old + 0.1 * torch.randn(4, 6, dtype=dtype)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 4, 1, 5])[:, None]
    adv = torch.randn(4, dtype=dtype)

    def loss_and_grad(sampler_logps):
        loss, _ = grpo_loss(current, adv, mask, config, old, ref, sampler_logps=sampler_logps)
        return loss, torch.autograd.grad(loss, current)[0]

    loss_plain, grad_plain = loss_and_grad(None)
    loss_corrected, grad_corrected = loss_and_grad(old.clone())
    assert torch.equal(loss_plain, loss_corrected)
    assert torch.equal(grad_plain, grad_corrected)
    assert grad_plain.abs().sum() > 0
