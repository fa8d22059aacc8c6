"""SFT targets and losses against hand computations."""

from __future__ import annotations

import math

import torch

from posttrain.algorithms.sft import IGNORE_INDEX, mtp_combined_loss, shifted_targets, token_cross_entropy_sum

X = IGNORE_INDEX
# One pack: sample A = [10, 11, 12], sample B = [20, 21, 22, 23], one padding token.
IDS = torch.tensor([[10, 11, 12, 20, 21, 22, 23, 0]])
POS = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
MASK = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)


def test_next_token_targets_never_cross_a_sample_boundary():
    expected = [[11, 12, X, 21, 22, 23, X, X]]
    assert shifted_targets(IDS, MASK, POS, shift=1).tolist() == expected


def test_mtp_targets_two_ahead_stay_in_the_sample():
    expected = [[12, X, X, 22, 23, X, X, X]]
    assert shifted_targets(IDS, MASK, POS, shift=2).tolist() == expected


def test_untrained_tokens_are_not_targets():
    mask = MASK.clone()
    mask[0, 5] = False  # token 22 is a prompt token
    assert shifted_targets(IDS, mask, POS, shift=1).tolist() == [[11, 12, X, 21, X, 23, X, X]]


def test_cross_entropy_sum_matches_float64_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.1, -1.0, 3.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[1, 2, X]])
    total, count = token_cross_entropy_sum(logits, targets)

    def nll(row, y):
        return -(row[y] - math.log(sum(math.exp(v) for v in row)))

    expected = nll([1.0, 2.0, 0.5], 1) + nll([0.1, -1.0, 3.0], 2)
    assert count.item() == 2
    assert abs(total.item() - expected) < 1e-6


def test_mtp_combined_loss_is_main_mean_plus_lambda_over_depth_times_mtp_means():
    loss = mtp_combined_loss(
        torch.tensor(6.0),
        torch.tensor(3),
        [torch.tensor(4.0), torch.tensor(9.0)],
        [torch.tensor(2), torch.tensor(3)],
        0.3,
    )
    assert abs(loss.item() - (2.0 + 0.3 / 2 * (2.0 + 3.0))) < 1e-6
