"""The quality measurement and budget shared by `evaluate` and the quantize back-off.

One definition (and the same KV cache, see dwc.kvcache), so the back-off in `quantize`
stops where `evaluate` will pass.
"""

from __future__ import annotations

from dwc.data import token_windows
from dwc.metrics import QualityTotals, compare, hf_logits
from dwc.runtime.scoring import runtime_logits


def measure(ctx, model, batch_size: int, description: str = "evaluating",
            kv_plan: dict | None = None) -> QualityTotals:
    """The reference (through transformers) vs `model` through dwc's runtime (its decoder,
    paged attention, GPU kernels, the fusion plan when there is one and, with a KV plan,
    its KV cache dtype), on the build file's evaluation windows. For a GGUF target the
    optimized side is the GGUF file itself, run by llama.cpp; for a TensorRT-LLM target,
    the exported checkpoint read back by dwc (formats/modelopt_hf.py) in transformers."""
    e = ctx.build.evaluation
    windows = token_windows(e.data, ctx.artifacts["tokenizer"], e.samples, e.seq_len)
    quantized = ctx.artifacts.get("quantized")
    if ctx.target.backend == "gguf":  # the bundle's own file, run by llama.cpp
        from dwc.backends.gguf import llama_logits

        optimized = llama_logits(quantized.path, e.seq_len)
        try:
            with ctx.reporter.progress(description, len(windows)) as advance:
                return compare(hf_logits(ctx.artifacts["reference"]), optimized, windows,
                               batch_size, advance)
        finally:
            optimized.close()
    if ctx.target.backend == "tensorrt-llm":
        # TensorRT-LLM cannot run here: the exported checkpoint through dwc's reader of
        # it (dequantized weights, FP8 input and KV rounding as hooks) in transformers.
        with ctx.reporter.progress(description, len(windows)) as advance:
            return compare(hf_logits(ctx.artifacts["reference"]), hf_logits(model), windows,
                           batch_size, advance)
    fp8_kv = kv_plan is not None and kv_plan["dtype"] == "fp8_e4m3"
    optimized = runtime_logits(model, ctx.compute_device,
                               weights_dir=quantized.folder if quantized is not None else None,
                               kv_dtype="fp8_e4m3" if fp8_kv else None,
                               kv_scales=kv_plan.get("kv_scales") if fp8_kv else None,
                               fusion=(ctx.artifacts.get("fusion") or {}).get("plan"))
    with ctx.reporter.progress(description, len(windows)) as advance:
        return compare(hf_logits(ctx.artifacts["reference"]), optimized, windows, batch_size,
                       advance)


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
