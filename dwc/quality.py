"""The quality measurement and budget shared by `evaluate` and the quantize back-off.

One definition, so the back-off in `quantize` stops exactly where `evaluate` will pass.
"""

from __future__ import annotations

from dwc.data import token_windows
from dwc.metrics import QualityTotals, compare, hf_logits


def measure(ctx, model, batch_size: int, description: str = "evaluating") -> QualityTotals:
    """Reference vs `model` on the build file's evaluation windows."""
    e = ctx.build.evaluation
    windows = token_windows(e.data, ctx.artifacts["tokenizer"], e.samples, e.seq_len)
    with ctx.reporter.progress(description, len(windows)) as advance:
        return compare(hf_logits(ctx.artifacts["reference"]), hf_logits(model), windows,
                       batch_size, advance)


def over_budget(quality: dict, evaluation) -> str | None:
    """Why `quality` misses the build file's budget, or None when it holds."""
    reasons = []
    if quality["delta_pct"] > evaluation.max_ppl_increase_pct:
        over = quality["delta_pct"] - evaluation.max_ppl_increase_pct
        reasons.append(f"perplexity {quality['baseline']:.4f} -> {quality['optimized']:.4f} "
                       f"(+{quality['delta_pct']:.3f}%), budget {evaluation.max_ppl_increase_pct}% "
                       f"(over by {over:.3f} points)")
    limit = evaluation.max_kl_divergence
    if limit is not None and quality["kl_divergence"] > limit:
        reasons.append(f"KL divergence {quality['kl_divergence']:.3g}, budget {limit:.3g}")
    return "; ".join(reasons) or None


def apply_budget(quality: dict, evaluation) -> str | None:
    """Record the current budget in `quality`; returns the reason it fails, if it does."""
    reason = over_budget(quality, evaluation)
    quality.update(budget_pct=evaluation.max_ppl_increase_pct,
                   kl_budget=evaluation.max_kl_divergence, passed=reason is None)
    return reason
