"""`evaluate`: measure the optimized model against the reference on held-out text and
enforce the quality budget (README.md, "Passes").

Perplexity before and after, KL divergence and top-1 agreement with the reference and,
when the build file names one, an evaluation task scored before and after with a paired
test (docs/QUALITY.md). The measurement is cached (it depends on the models, the data, the
task file and the window settings); the budget and the task's verdict are applied on every
build, so raising `max_ppl_increase_pct` or the task's margin after a failure re-uses the
measurement.
"""

from __future__ import annotations

import json

from dwc.errors import QualityBudgetExceeded
from dwc.bundle.hashing import sha256_file
from dwc.passes.base import BatchOptions, Pass, PassResult
from dwc.quality.gate import apply_budget, measure, measure_task
from dwc.compiler.reports import json_bytes, line_chart

QUALITY_FILE = "quality.json"
TASK_FILE = "task.json"


class Evaluate(Pass):
    name = "evaluate"
    description = ("Perplexity of the optimized model, run by dwc's runtime with its KV "
                   "plan, vs the original on the evaluation data, KL divergence and top-1 "
                   "agreement, and the build file's task (if any) before and after with a "
                   "paired test; fails the build (exit 3) beyond the budget or when a "
                   "required task is not shown equivalent.")
    reads = ("reference", "model", "tokenizer")
    optional_reads = ("quantized", "kv_plan", "fusion")
    writes = ("quality",)
    Options = BatchOptions
    cacheable = True

    def key_material(self, ctx, options):
        e = ctx.build.evaluation
        task = e.task and {"sha256": sha256_file(e.task.path),
                           "max_new_tokens": e.task.max_new_tokens}
        return {"data": sha256_file(e.data), "samples": e.samples, "seq_len": e.seq_len,
                "task": task}

    def run(self, ctx, options) -> PassResult:
        totals = measure(ctx, ctx.artifacts.model, options.batch_size,
                         kv_plan=ctx.artifacts.kv_plan)
        quality = totals.result()
        quality.update(windows=len(totals.window_ppl_ref), data=str(ctx.build.evaluation.data))
        png = line_chart({"original": totals.window_ppl_ref, "optimized": totals.window_ppl_opt},
                         title="Perplexity per evaluation window", xlabel="window",
                         ylabel="perplexity")
        metrics = {k: quality[k] for k in ("baseline", "optimized", "delta_pct",
                                           "kl_divergence", "top1_agreement")}
        reports = {"quality.png": png}
        if ctx.build.evaluation.task is not None:
            task = measure_task(ctx, ctx.artifacts.model, kv_plan=ctx.artifacts.kv_plan)
            quality["task"] = task["summary"]
            metrics |= {"task_accuracy_before": task["summary"]["accuracy_before"],
                        "task_accuracy_after": task["summary"]["accuracy_after"]}
            reports[TASK_FILE] = json_bytes(task)
        report = dict(quality, window_ppl_baseline=totals.window_ppl_ref,
                      window_ppl_optimized=totals.window_ppl_opt)
        reports[QUALITY_FILE] = json_bytes(report)
        return PassResult(outputs={"quality": quality}, metrics=metrics, reports=reports)

    def after(self, ctx, options, result: PassResult) -> None:
        """Apply the current budget, also to a cached measurement."""
        quality = result.outputs["quality"]
        reason = apply_budget(quality, ctx.build.evaluation)
        report = json.loads(ctx.reports[QUALITY_FILE])
        report.update({k: quality[k] for k in ("budget_pct", "kl_budget", "passed", "task")
                       if k in quality})
        ctx.reports[QUALITY_FILE] = json_bytes(report)
        if TASK_FILE in ctx.reports:  # the verdict next to the items it was drawn from
            task = json.loads(ctx.reports[TASK_FILE])
            ctx.reports[TASK_FILE] = json_bytes(dict(task, summary=quality["task"]))
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
