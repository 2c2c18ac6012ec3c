"""Paired statistics of two models scored on the same task items (docs/QUALITY.md).

Each item is right (True) or wrong (False) for the model before and after optimization.
Two questions, answered on the same pairs:

- McNemar's exact test: is the accuracy different? Only the discordant items count (`lost`:
  right before, wrong after; `gained`: the other way); under "no difference" each is a
  fair coin, so the two-sided p-value is the binomial tail of the smaller count, doubled.
- Equivalence: a paired bootstrap interval (items resampled with their pair, fixed seed) on
  the accuracy difference, after - before. "Equivalent within margin" when the whole
  interval lies inside [-margin, +margin]; at 90% confidence that is the interval form of
  two one-sided tests (TOST) at 5% each.
"""

from __future__ import annotations

import math
from fractions import Fraction

from dwc.constants import TASK_BOOTSTRAP, TASK_BOOTSTRAP_SEED, TASK_CONFIDENCE


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(lost, gained)), X ~ Binomial(lost +
    gained, 1/2), capped at 1 (1 when there is no discordant pair). Computed in exact
    fractions, so small p-values do not lose digits."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, k) for k in range(min(lost, gained) + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def bootstrap_interval(before: list[bool], after: list[bool], resamples: int = TASK_BOOTSTRAP,
                       confidence: float = TASK_CONFIDENCE,
                       seed: int = TASK_BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile interval of accuracy(after) - accuracy(before) over `resamples` paired
    resamples of the items (each draw takes an item's two outcomes together)."""
    import torch

    diff = torch.tensor([int(a) - int(b) for b, a in zip(before, after)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (resamples, len(diff)), generator=gen)
    means = diff[idx].mean(1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return round(low.item(), 6), round(high.item(), 6)


def compare_paired(before: list[bool], after: list[bool]) -> dict:
    """Accuracies, discordant counts, McNemar's p-value and the bootstrap interval."""
    if len(before) != len(after) or not before:
        raise ValueError("paired outcomes need the same, non-zero number of items")
    n = len(before)
    lost = sum(1 for b, a in zip(before, after) if b and not a)
    gained = sum(1 for b, a in zip(before, after) if a and not b)
    acc_before, acc_after = sum(before) / n, sum(after) / n
    low, high = bootstrap_interval(before, after)
    return {"n": n, "accuracy_before": round(acc_before, 6), "accuracy_after": round(acc_after, 6),
            "difference": round(acc_after - acc_before, 6), "lost": lost, "gained": gained,
            "mcnemar_p": mcnemar_exact(lost, gained), "ci": [low, high],
            "confidence": TASK_CONFIDENCE, "resamples": TASK_BOOTSTRAP,
            "seed": TASK_BOOTSTRAP_SEED}


def equivalent(stats: dict, margin: float) -> bool:
    """Whether the interval lies inside [-margin, +margin] (the bounds included)."""
    low, high = stats["ci"]
    return -margin <= low and high <= margin
