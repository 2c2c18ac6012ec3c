"""Quality metrics against a float64 reference computed independently."""

from __future__ import annotations

import math

import numpy as np
import torch

from dwc.quality.metrics import QualityTotals, compare


def reference_metrics(ref, opt, ids):
    """Per-token log-softmax in float64 numpy, by the textbook formulas."""
    ref, opt = ref[:, :-1].astype(np.float64), opt[:, :-1].astype(np.float64)
    def log_softmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
    lr, lo = log_softmax(ref), log_softmax(opt)
    t = ids[:, 1:]
    nll_r = -np.take_along_axis(lr, t[..., None], -1).mean()
    nll_o = -np.take_along_axis(lo, t[..., None], -1).mean()
    kl = (np.exp(lr) * (lr - lo)).sum(-1).mean()
    agree = (lr.argmax(-1) == lo.argmax(-1)).mean()
    return math.exp(nll_r), math.exp(nll_o), kl, agree


def test_metrics_match_float64_formulas():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 17), generator=gen)
    ref = torch.randn(3, 17, 50, generator=gen) * 3
    opt = ref + torch.randn(3, 17, 50, generator=gen) * 0.5
    totals = QualityTotals()
    totals.update(ref, opt, ids)
    r = totals.result()
    base, new, kl, agree = reference_metrics(ref.numpy(), opt.numpy(), ids.numpy())
    assert abs(r["baseline"] - base) / base < 1e-5
    assert abs(r["optimized"] - new) / new < 1e-5
    assert abs(r["kl_divergence"] - kl) < 1e-6
    assert abs(r["top1_agreement"] - agree) < 1e-6
    assert r["tokens"] == 3 * 16
    assert abs(r["delta_pct"] - (new - base) / base * 100) < 1e-3


def test_identical_models_have_zero_loss_and_full_agreement():
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 30, (9,), generator=gen) for _ in range(5)] + [torch.tensor([1, 2, 3])]
    table = torch.randn(30, 30, generator=gen)
    fn = lambda ids: table[ids]  # noqa: E731  a "model": logits depend on the current token
    totals = compare(fn, fn, windows, batch_size=2)
    r = totals.result()
    assert r["delta_pct"] == 0 and r["kl_divergence"] == 0 and r["top1_agreement"] == 1.0
    assert r["tokens"] == 5 * 8 + 2
    assert len(totals.window_ppl_ref) == 6
