"""The paired statistics of an evaluation task (dwc/quality/paired.py) on constructed cases."""

from __future__ import annotations

import math

import pytest

from dwc.quality.paired import bootstrap_interval, compare_paired, equivalent, mcnemar_exact


@pytest.mark.parametrize("lost, gained, p", [
    (0, 0, 1.0),                  # no discordant pair: no evidence of a difference
    (5, 0, 2 / 2 ** 5),           # 2 * P(X <= 0), X ~ Bin(5, 1/2) = 2/32
    (6, 0, 2 / 2 ** 6),
    (1, 9, 2 * (1 + 10) / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10 = 0.021484375
    (2, 8, 2 * (1 + 10 + 45) / 1024),
    (3, 3, 1.0),                  # 2 * 42/64 > 1: capped
    (4, 5, 1.0),
])
def test_mcnemar_exact_matches_the_binomial_by_hand(lost, gained, p):
    assert mcnemar_exact(lost, gained) == pytest.approx(p, abs=1e-15)
    assert mcnemar_exact(gained, lost) == mcnemar_exact(lost, gained)


def test_mcnemar_exact_small_p_values_keep_their_digits():
    # 2 * P(X <= 0), X ~ Bin(80, 1/2) = 2^-79, far below float subtraction's reach
    assert mcnemar_exact(80, 0) == pytest.approx(2.0 ** -79, rel=1e-12)
    n = 60
    tail = sum(math.comb(n, k) for k in range(16)) / 2 ** n
    assert mcnemar_exact(15, 45) == pytest.approx(2 * tail, rel=1e-12)


def test_identical_predictions_are_equivalent():
    outcomes = [i % 3 != 0 for i in range(60)]
    stats = compare_paired(outcomes, outcomes)
    assert stats["lost"] == stats["gained"] == 0 and stats["difference"] == 0
    assert stats["ci"] == [0.0, 0.0] and stats["mcnemar_p"] == 1.0
    assert equivalent(stats, 0.0) and equivalent(stats, 0.02)


def test_a_known_difference_is_significant_and_not_equivalent():
    before = [True] * 50
    after = [i >= 10 for i in range(50)]  # ten items lost, none gained
    stats = compare_paired(before, after)
    assert (stats["accuracy_before"], stats["accuracy_after"]) == (1.0, 0.8)
    assert stats["difference"] == pytest.approx(-0.2) and (stats["lost"], stats["gained"]) == (10, 0)
    assert stats["mcnemar_p"] == pytest.approx(2 / 2 ** 10)
    low, high = stats["ci"]
    assert low < -0.2 < high < 0
    assert not equivalent(stats, 0.05) and not equivalent(stats, 0.1)
    assert equivalent(stats, 0.5)


def test_one_flip_in_a_hundred_is_equivalent_within_a_margin_but_not_a_tiny_one():
    before = [True] * 80 + [False] * 20
    after = list(before)
    after[0] = False
    stats = compare_paired(before, after)
    assert stats["mcnemar_p"] == 1.0 and stats["difference"] == pytest.approx(-0.01)
    low, high = stats["ci"]
    assert -0.04 <= low <= -0.01 and high == 0.0
    assert equivalent(stats, 0.05) and not equivalent(stats, 0.005)


def test_bootstrap_interval_is_seeded_and_close_to_the_normal_interval():
    """n = 400, 40 lost, 20 gained: difference -0.05, paired standard error
    sqrt((b + c)/n - d^2) / sqrt(n) = 0.0192, 90% normal interval -0.05 +- 0.0316."""
    before = [True] * 40 + [False] * 20 + [True] * 200 + [False] * 140
    after = [False] * 40 + [True] * 20 + [True] * 200 + [False] * 140
    low, high = bootstrap_interval(before, after)
    assert (low, high) == bootstrap_interval(before, after)
    se = math.sqrt((60 / 400 - 0.05 ** 2) / 400)
    assert low == pytest.approx(-0.05 - 1.645 * se, abs=0.006)
    assert high == pytest.approx(-0.05 + 1.645 * se, abs=0.006)


def test_outcomes_must_pair():
    with pytest.raises(ValueError):
        compare_paired([True], [True, False])
    with pytest.raises(ValueError):
        compare_paired([], [])
