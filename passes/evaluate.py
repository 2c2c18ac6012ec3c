"""`evaluate`: measure the optimized model against the reference on held-out text and
enforce the quality budget (README.md, "Passes").

Perplexity before and after, KL divergence and top-1 agreement with the reference. The
measurement is cached (it depends on the models, the data and the window settings); the
budget check runs on every build, so raising `max_ppl_increase_pct` after a failure
re-uses the measurement.
"""

from __future__ import annotations

import json

from dwc.errors import QualityBudgetExceeded
from dwc.bundle.hashing import sha256_file
from dwc.passes.base import BatchOptions, Pass, PassResult
from dwc.quality.gate import apply_budget, measure
from dwc.compiler.reports import json_bytes, line_chart

QUALITY_FILE = "quality.json"


class Evaluate(Pass):
    name = "evaluate"
    description = ("Perplexity of the optimized model, run by dwc's runtime with its KV "
                   "plan, vs the original on the evaluation data, KL divergence and top-1 "
                   "agreement; fails the build (exit 3) beyond the build file's budget.")
    reads = ("reference", "model", "tokenizer")
    optional_reads = ("quantized", "kv_plan", "fusion")
    writes = ("quality",)
    Options = BatchOptions
    cacheable = True

    def key_material(self, ctx, options):
        e = ctx.build.evaluation
        return {"data": sha256_file(e.data), "samples": e.samples, "seq_len": e.seq_len}

    def run(self, ctx, options) -> PassResult:
        totals = measure(ctx, ctx.artifacts.model, options.batch_size,
                         kv_plan=ctx.artifacts.kv_plan)
        quality = totals.result()
        quality.update(windows=len(totals.window_ppl_ref), data=str(ctx.build.evaluation.data))
        png = line_chart({"original": totals.window_ppl_ref, "optimized": totals.window_ppl_opt},
                         title="Perplexity per evaluation window", xlabel="window",
                         ylabel="perplexity")
        report = dict(quality, window_ppl_baseline=totals.window_ppl_ref,
                      window_ppl_optimized=totals.window_ppl_opt)
        return PassResult(outputs={"quality": quality},
                          metrics={k: quality[k] for k in ("baseline", "optimized", "delta_pct",
                                                           "kl_divergence", "top1_agreement")},
                          reports={QUALITY_FILE: json_bytes(report), "quality.png": png})

    def after(self, ctx, options, result: PassResult) -> None:
        """Apply the current budget, also to a cached measurement."""
        quality = result.outputs["quality"]
        reason = apply_budget(quality, ctx.build.evaluation)
        report = json.loads(ctx.reports[QUALITY_FILE])
        report.update({k: quality[k] for k in ("budget_pct", "kl_budget", "passed")})
        ctx.reports[QUALITY_FILE] = json_bytes(report)
        if reason:
            culprits = ", ".join(ctx.lineage.get("model", [])) or "none recorded"
            scheme = ctx.artifacts.quantized
            what = f"{scheme.describe()}: " if scheme is not None else ""
            raise QualityBudgetExceeded(f"quality budget exceeded: {what}{reason}; "
                                        f"passes that changed the model: {culprits}")

    def save(self, outputs, folder) -> None:
        (folder / QUALITY_FILE).write_bytes(json_bytes(outputs["quality"]))

    def load(self, folder, ctx) -> dict:
        return {"quality": json.loads((folder / QUALITY_FILE).read_text())}
