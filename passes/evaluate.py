"""`evaluate`: measure the optimized model against the reference on held-out text and
enforce the quality budget (DESIGN.md §7).

Perplexity before and after, KL divergence and top-1 agreement with the reference. The
measurement is cached (it depends on the models, the data and the window settings); the
budget check runs on every build, so raising `max_ppl_increase_pct` after a failure
re-uses the measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dwc.config import option, positive
from dwc.data import token_windows
from dwc.errors import QualityBudgetExceeded
from dwc.hashing import sha256_file
from dwc.metrics import compare, hf_logits
from dwc.passes.base import Pass, PassResult
from dwc.reports import json_bytes, line_chart

QUALITY_FILE = "quality.json"


@dataclass
class EvaluateOptions:
    batch_size: int = option(4, help="windows per forward pass")

    def validate(self, path: str) -> None:
        positive(self, path, "batch_size")


class Evaluate(Pass):
    name = "evaluate"
    description = ("Perplexity of the optimized model vs the original on the evaluation "
                   "data, KL divergence and top-1 agreement; fails the build (exit 3) "
                   "beyond evaluation.max_ppl_increase_pct.")
    reads = ("reference", "model", "tokenizer")
    writes = ("quality",)
    Options = EvaluateOptions
    cacheable = True

    def key_material(self, ctx, options):
        e = ctx.build.evaluation
        return {"data": sha256_file(e.data), "samples": e.samples, "seq_len": e.seq_len}

    def run(self, ctx, options) -> PassResult:
        e = ctx.build.evaluation
        windows = token_windows(e.data, ctx.artifacts["tokenizer"], e.samples, e.seq_len)
        with ctx.reporter.progress("evaluating", len(windows)) as advance:
            totals = compare(hf_logits(ctx.artifacts["reference"]),
                             hf_logits(ctx.artifacts["model"]), windows,
                             options.batch_size, advance)
        quality = totals.result(budget_pct=e.max_ppl_increase_pct)
        quality.update(windows=len(windows), data=str(e.data))
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
        budget = ctx.build.evaluation.max_ppl_increase_pct
        quality["budget_pct"] = budget
        quality["passed"] = quality["delta_pct"] <= budget
        report = json.loads(ctx.reports[QUALITY_FILE])
        report.update(budget_pct=budget, passed=quality["passed"])
        ctx.reports[QUALITY_FILE] = json_bytes(report)
        if not quality["passed"]:
            culprits = ", ".join(ctx.lineage.get("model", [])) or "none recorded"
            raise QualityBudgetExceeded(
                f"quality budget exceeded: perplexity {quality['baseline']:.4f} -> "
                f"{quality['optimized']:.4f} (+{quality['delta_pct']:.3f}%), budget "
                f"{budget}% (over by {quality['delta_pct'] - budget:.3f} points); "
                f"passes that changed the model: {culprits}")

    def save(self, outputs, folder) -> None:
        (folder / QUALITY_FILE).write_bytes(json_bytes(outputs["quality"]))

    def load(self, folder, ctx) -> dict:
        return {"quality": json.loads((folder / QUALITY_FILE).read_text())}
