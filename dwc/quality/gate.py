"""The quality measurement and budget shared by `evaluate` and the quantize back-off.

One definition (and the same KV cache, see dwc.model.kvcache), so the back-off in `quantize`
stops where `evaluate` will pass.
"""

from __future__ import annotations

from dwc import backends
from dwc.bundle.hashing import sha256_file
from dwc.quality import paired, task as tasks
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


def measure_task(ctx, model, kv_plan: dict | None = None) -> dict:
    """The build file's evaluation task scored by the reference (before) and by the
    optimized model as the backend runs it (after), with the paired statistics
    (dwc/quality/paired.py): {"summary": for the manifest, "items": each item's outcome}."""
    items = tasks.read_task(ctx.build.evaluation.task.path)
    before = _score_task(ctx, hf_logits(ctx.artifacts.reference), items, "before")
    after = _score_task(ctx, backends.get(ctx.target.backend).eval_logits(ctx, model, kv_plan),
                        items, "after")
    stats = paired.compare_paired([r["correct"] for r in before], [r["correct"] for r in after])
    path = ctx.build.evaluation.task.path
    summary = {"path": str(path), "sha256": sha256_file(path),
               "multiple_choice": sum(i.choices is not None for i in items),
               "exact_match": sum(i.choices is None for i in items)} | stats
    rows = [{"where": i.where, "id": i.id, "answer": i.answer,
             "before": b["prediction"], "after": a["prediction"],
             "correct_before": b["correct"], "correct_after": a["correct"]}
            for i, b, a in zip(items, before, after)]
    return {"summary": summary, "items": rows}


def _score_task(ctx, logits_fn, items, side: str) -> list[dict]:
    e = ctx.build.evaluation
    try:
        with ctx.reporter.progress(f"task ({side})", len(items)) as advance:
            return tasks.score(items, ctx.artifacts.tokenizer, logits_fn, e.seq_len,
                               e.task.max_new_tokens, advance)
    finally:
        getattr(logits_fn, "close", lambda: None)()


def task_verdict(summary: dict, task) -> str | None:
    """Record the margin and the verdict in the task's summary; returns why the build
    fails when the task is required and not shown equivalent."""
    ok = paired.equivalent(summary, task.margin)
    summary.update(margin=task.margin, required=task.required, equivalent=ok,
                   verdict="equivalent" if ok else "not shown equivalent")
    if ok or not task.required:
        return None
    low, high = summary["ci"]
    return (f"task {task.path.name}: accuracy {summary['accuracy_before']:.4g} -> "
            f"{summary['accuracy_after']:.4g} (n {summary['n']}, lost {summary['lost']}, "
            f"gained {summary['gained']}, McNemar p {summary['mcnemar_p']:.3g}); the "
            f"{summary['confidence']:.0%} interval of the difference [{low:+.4f}, {high:+.4f}] "
            f"is not inside +-{task.margin} (required)")


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
    reasons = [over_budget(quality, evaluation)]
    if quality.get("task") is not None and evaluation.task is not None:
        reasons.append(task_verdict(quality["task"], evaluation.task))
    reason = "; ".join(r for r in reasons if r) or None
    quality.update(budget_pct=evaluation.max_ppl_increase_pct,
                   kl_budget=evaluation.max_kl_divergence, passed=reason is None)
    return reason
