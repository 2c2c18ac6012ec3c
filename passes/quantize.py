"""`quantize`: the target's weight scheme through llm-compressor, in the compressed-tensors
layout, with a measured back-off.

After quantizing, the compressed files are loaded back with transformers, and that model
is what later passes see: quality is measured on exactly what the bundle holds. The error
each quantized Linear adds (relative squared error of its output on calibration windows,
activation quantization included) is measured and reported. With `optimization: auto`,
when the evaluation budget is missed, the layer with the largest error stays in bf16 and
the model is quantized again, one layer at a time, up to `max_backoff_layers`; what is
then still over budget fails in `evaluate` (exit 3).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from dwc.config import option, positive
from dwc.quality.data import token_windows
from dwc.bundle.hashing import sha256_file
from dwc.model.kvcache import kv_plan_for_measuring
from dwc.passes.base import Pass, PassResult
from dwc.quality.gate import measure, over_budget
from dwc.compiler.quantization import load_compressed, recipe, run_oneshot, save_compressed
from dwc.compiler.reports import bar_chart, json_bytes
from dwc.quality.sensitivity import layer_errors

CHECKPOINT = "checkpoint"
SUMMARY = "quantization.json"


@dataclass
class QuantizeOptions:
    method: Optional[Literal["rtn", "gptq", "awq"]] = option(
        None, help="rtn (round to nearest), gptq or awq; default: the target's")
    group_size: Optional[int] = option(None, help="INT4 weights per scale; default: the target's")
    smoothing_strength: float = option(0.8, help="SmoothQuant alpha for int8-w8a8 (0 turns it off)")
    int8_activations: Literal["dynamic", "static"] = option(
        "dynamic", help="int8-w8a8 activations: per-token dynamic or per-tensor static scales")
    keep_bf16: list[str] = option([], help="Linear layers never quantized (besides lm_head)")
    backoff: bool = option(True, help="with optimization: auto, keep the worst layers in bf16 "
                                      "until the evaluation budget holds")
    max_backoff_layers: int = option(8, help="most layers the back-off keeps in bf16")
    error_windows: int = option(8, help="calibration windows used to measure per-layer error")

    def validate(self, path: str) -> None:
        positive(self, path, "group_size", "error_windows")
        if self.max_backoff_layers < 0:
            from dwc.errors import BuildFileError
            raise BuildFileError(f"{path}.max_backoff_layers: must be >= 0")


@dataclass
class Quantized:
    """The compressed checkpoint on disk and what it is, for emit and the manifest."""

    folder: Path
    summary: dict = field(default_factory=dict)

    def describe(self) -> str:
        s = self.summary
        kept = f", {len(s['fallback_layers'])} layers kept in bf16" if s["fallback_layers"] else ""
        return f"{s['scheme']} ({s['method']}){kept}"


class Quantize(Pass):
    name = "quantize"
    description = ("Quantize the Linear layers to the target's scheme with llm-compressor "
                   "(FP8 W8A8, INT8 SmoothQuant W8A8, INT4 AWQ/GPTQ/RTN W4A16) in the "
                   "compressed-tensors layout; back off layer by layer to meet the budget.")
    reads = ("model", "reference", "tokenizer")
    optional_reads = ("calibration",)  # K / V ranges, for the FP8 KV cache in the back-off
    writes = ("model", "quantized")
    Options = QuantizeOptions
    cacheable = True
    lossy = True

    def key_material(self, ctx, options):
        c, e = ctx.build.calibration, ctx.build.evaluation
        return {"scheme": _settings(ctx, options), "calibration": [sha256_file(c.data), c.samples,
                                                                  c.seq_len],
                "backoff": _backoff_on(ctx, options) and [sha256_file(e.data), e.samples, e.seq_len,
                                                          e.max_ppl_increase_pct, e.max_kl_divergence]}

    def run(self, ctx, options) -> PassResult:
        s = _settings(ctx, options)
        c = ctx.build.calibration
        windows = token_windows(c.data, ctx.artifacts.tokenizer, c.samples, c.seq_len)
        keep = list(options.keep_bf16)
        fallback: list[str] = []
        while True:
            folder, errors, model = self._attempt(ctx, s, keep + fallback, windows, options)
            reason = None
            if _backoff_on(ctx, options):
                quality = measure(ctx, model, 4, "checking budget",
                                  kv_plan=kv_plan_for_measuring(ctx)).result()
                reason = over_budget(quality, ctx.build.evaluation)
            if not reason or not errors or len(fallback) >= options.max_backoff_layers:
                break
            worst = max(errors, key=errors.get)
            ctx.reporter.info(f"      over budget ({reason}); keeping {worst} in bf16")
            fallback.append(worst)
        summary = _summary(s, keep, fallback, errors, folder)
        names = sorted(errors)
        png = bar_chart(names, [max(errors[n], 1e-12) for n in names], log=True,
                        title=f"Per-layer output error, {s['scheme']} ({s['method']})",
                        ylabel="relative squared error")
        return PassResult(
            outputs={"model": model, "quantized": Quantized(folder, summary)},
            metrics={"scheme": s["scheme"], "method": s["method"],
                     "fallback_layers": len(fallback),
                     "max_layer_error": max(errors.values(), default=0.0),
                     "weight_bytes": summary["weight_bytes"]},
            reports={"layer_error.json": json_bytes({"scheme": s, "layers": errors,
                                                     "fallback_layers": fallback}),
                     "layer_error.png": png})

    def _attempt(self, ctx, s: dict, ignore: list[str], windows, options):
        """Quantize a fresh copy, measure per-layer error, save compressed, load it back."""
        work = copy.deepcopy(ctx.artifacts.model)
        modifiers = recipe(s["scheme"], s["method"], ignore, s["group_size"] or 128,
                           s["smoothing_strength"], s["int8_activations"])
        with ctx.reporter.status(f"quantizing ({s['scheme']}, {s['method']})"):
            run_oneshot(work, windows, modifiers)
        errors = layer_errors(work, windows[:options.error_windows])
        folder = ctx.workdir / f"quantize-{len(ignore)}"
        shutil.rmtree(folder, ignore_errors=True)
        save_compressed(work, folder)
        del work
        return folder, errors, load_compressed(folder, ctx.compute_device)

    def save(self, outputs, folder: Path) -> None:
        q = outputs["quantized"]
        shutil.copytree(q.folder, folder / CHECKPOINT)
        (folder / SUMMARY).write_bytes(json_bytes(q.summary))

    def load(self, folder: Path, ctx) -> dict:
        summary = json.loads((folder / SUMMARY).read_text())
        model = load_compressed(folder / CHECKPOINT, ctx.compute_device)
        return {"model": model, "quantized": Quantized(folder / CHECKPOINT, summary)}


def _settings(ctx, options) -> dict:
    w = ctx.target.weights
    return {"scheme": w.scheme, "method": options.method or w.method or "rtn",
            "group_size": options.group_size or w.group_size,
            "smoothing_strength": options.smoothing_strength if w.smoothquant else 0.0,
            "int8_activations": options.int8_activations,
            "keep_bf16": sorted(options.keep_bf16)}


def _backoff_on(ctx, options) -> bool:
    return options.backoff and ctx.build.optimization == "auto"


def _summary(s: dict, keep: list[str], fallback: list[str], errors: dict, folder: Path) -> dict:
    weight_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {
        "scheme": s["scheme"], "method": s["method"], "format": "compressed-tensors",
        "group_size": s["group_size"] if s["scheme"] == "int4-w4a16" else None,
        "smoothing_strength": s["smoothing_strength"] or None,
        "activations": {"fp8-w8a8": "fp8 static per-tensor",
                        "int8-w8a8": f"int8 {s['int8_activations']} "
                                     f"{'per-token' if s['int8_activations'] == 'dynamic' else 'per-tensor'}",
                        "int4-w4a16": "bf16"}[s["scheme"]],
        "quantized_layers": len(errors),
        "excluded": sorted({"lm_head", *keep, *fallback}),
        "fallback_layers": fallback,
        "weight_bytes": weight_bytes,
    }
