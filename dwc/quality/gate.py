"""The quality measurement and budget shared by `evaluate` and the quantize back-off.

One definition (and the same KV cache, see dwc.model.kvcache), so the back-off in `quantize`
stops where `evaluate` will pass.
"""

from __future__ import annotations

from dwc import backends
from dwc.quality.data import token_windows
from dwc.quality.metrics import QualityTotals, compare, hf_logits


def measure(ctx, model, batch_size: int, description: str = "evaluating",
            kv_plan: dict | None = None) -> QualityTotals:
    """The reference (through transformers) against the optimized model as the target's
    backend runs it (`Backend.eval_logits`: dwc's runtime for torch-triton, llama.cpp on
    the bundle's own file for GGUF, the exported checkpoint read back for TensorRT-LLM),
    on the build file's evaluation windows."""
    e = ctx.build.evaluation
    windows = token_windows(e.data, ctx.artifacts.tokenizer, e.samples, e.seq_len)
    optimized = backends.get(ctx.target.backend).eval_logits(ctx, model, kv_plan)
    try:
        with ctx.reporter.progress(description, len(windows)) as advance:
            return compare(hf_logits(ctx.artifacts.reference), optimized, windows,
                           batch_size, advance)
    finally:
        getattr(optimized, "close", lambda: None)()


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
