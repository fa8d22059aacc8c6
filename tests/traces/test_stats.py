"""pass@k against hand-derived values and a float64 binomial computation; the summary's accounting."""

from __future__ import annotations

from math import comb

import pytest

from posttrain.traces.stats import pass_at_k, summarize


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),  # pass@1 is the fraction correct
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 0, 4, 0.0),
        (4, 4, 1, 1.0),
        (4, 1, 4, 1.0),  # n - c < k: some sample of every k-subset is correct
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_form_everywhere():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 2, 5)


def sample(prompt, source, verified, accepted, tokens, **verdicts):
    return {
        "prompt_index": prompt,
        "source": source,
        "verified": verified,
        "accepted": accepted,
        "num_tokens": tokens,
        "filters": {"format": None, "repetition": None, **verdicts},
        "reward_total": float(verified),
    }


def test_summary_counts_acceptance_filters_and_pass_at_k_per_source():
    samples = [
        sample(0, "a.jsonl", True, True, 10),
        sample(0, "a.jsonl", True, False, 30, format="bad"),
        sample(1, "a.jsonl", False, False, 50, repetition="loop"),
        sample(1, "a.jsonl", False, False, 20) | {"reward_total": None},
        sample(2, "b.jsonl", True, True, 12),
        sample(2, "b.jsonl", False, False, 14),
    ]
    summary, lengths = summarize(samples, [{"prompt_index": 3, "reason": "timeout"}], ks=[1, 2])
    assert summary["prompts"] == 3 and summary["failed_prompts"] == 1
    assert summary["samples"] == 6 and summary["verified"] == 3 and summary["accepted"] == 2
    assert summary["unscored"] == 1
    a, b = summary["per_source"]["a.jsonl"], summary["per_source"]["b.jsonl"]
    assert a["acceptance_rate"] == pytest.approx(1 / 4) and b["acceptance_rate"] == pytest.approx(1 / 2)
    assert a["pass_at_k"] == {"1": pytest.approx((1.0 + 0.0) / 2), "2": pytest.approx((1.0 + 0.0) / 2)}
    assert b["pass_at_k"] == {"1": pytest.approx(0.5), "2": pytest.approx(1.0)}
    assert summary["filters"]["format"] == {
        "rejected": 1,
        "rejected_rate": pytest.approx(1 / 6),
        "rejected_verified": 1,
        "rejected_verified_rate": pytest.approx(1 / 3),
    }
    assert summary["filters"]["repetition"]["rejected_verified"] == 0
    assert lengths == {"all": [10, 30, 50, 20, 12, 14], "verified": [10, 30, 12], "accepted": [10, 12]}
