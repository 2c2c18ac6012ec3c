"""`modelopt-quantize`: the target's scheme through NVIDIA ModelOpt, exported as the unified
Hugging Face checkpoint TensorRT-LLM loads (dwc/backends/tensorrt_llm/checkpoint.py).

`mtq.quantize` calibrates on the build file's calibration windows (FP8: per-tensor
weight and input scales, amax / 448, and K / V scales with an FP8 KV cache; INT4 AWQ:
the AWQ search, groups of the target's size), `export_hf_checkpoint` writes the layout,
and dwc's reader of that layout is the model later passes measure: quality is measured on
the exported files, since TensorRT-LLM cannot run here.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dwc.quality.data import token_windows
from dwc.bundle.hashing import sha256_file
from dwc.passes.base import NoOptions, Pass, PassResult

CHECKPOINT = "checkpoint"
SUMMARY = "quantization.json"


@dataclass
class ModelOptQuantized:
    """The exported checkpoint on disk and what it is, for evaluate, emit and the manifest."""

    folder: Path
    summary: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.summary['scheme']} (ModelOpt {self.summary['quant_algo']})"


class ModelOptQuantize(Pass):
    name = "modelopt-quantize"
    description = ("Quantize with NVIDIA ModelOpt (FP8 W8A8 with FP8 KV scales, INT4 AWQ) on "
                   "the calibration data and export the unified Hugging Face checkpoint "
                   "TensorRT-LLM loads.")
    reads = ("model", "tokenizer")
    writes = ("model", "quantized")
    Options = NoOptions
    cacheable = True
    lossy = True

    def key_material(self, ctx, options):
        from importlib.metadata import version

        c, t = ctx.build.calibration, ctx.target
        return {"scheme": t.weights.scheme, "group_size": t.weights.group_size,
                "kv": t.kv_cache_dtype, "calibration": [sha256_file(c.data), c.samples, c.seq_len],
                "modelopt": version("nvidia-modelopt"), "version": 1}

    def run(self, ctx, options) -> PassResult:
        from dwc.backends.tensorrt_llm.checkpoint import load_model, quantize_and_export

        c, t = ctx.build.calibration, ctx.target
        windows = token_windows(c.data, ctx.artifacts.tokenizer, c.samples, c.seq_len)
        folder = ctx.workdir / "modelopt"
        shutil.rmtree(folder, ignore_errors=True)
        with ctx.reporter.progress("calibrating with ModelOpt", 1) as advance:
            quantize_and_export(copy.deepcopy(ctx.artifacts.model), t.weights.scheme,
                                t.kv_cache_dtype == "fp8_e4m3", t.weights.group_size,
                                windows, folder)
            advance(1)
        summary = _summary(folder, t.weights.scheme)
        model = load_model(folder, ctx.compute_device)
        return PassResult(outputs={"model": model,
                                   "quantized": ModelOptQuantized(folder, summary)},
                          metrics={"quant_algo": summary["quant_algo"],
                                   "kv_cache_quant_algo": summary["kv_cache_quant_algo"],
                                   "quantized_layers": summary["quantized_layers"],
                                   "weight_bytes": summary["weight_bytes"]})

    def save(self, outputs, folder: Path) -> None:
        q = outputs["quantized"]
        shutil.copytree(q.folder, folder / CHECKPOINT)
        (folder / SUMMARY).write_text(json.dumps(q.summary))

    def load(self, folder: Path, ctx) -> dict:
        from dwc.backends.tensorrt_llm.checkpoint import load_model

        summary = json.loads((folder / SUMMARY).read_text())
        return {"model": load_model(folder / CHECKPOINT, ctx.compute_device),
                "quantized": ModelOptQuantized(folder / CHECKPOINT, summary)}


def _summary(folder: Path, scheme: str) -> dict:
    from safetensors import safe_open

    from dwc.backends.tensorrt_llm.checkpoint import read_quant_config

    quant = read_quant_config(folder)
    layers = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            layers += sum(k.endswith(".weight_scale") for k in f.keys())
    return {"scheme": scheme, "method": "modelopt", "format": "modelopt-hf (TensorRT-LLM)",
            "quant_algo": quant["quant_algo"],
            "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
            "group_size": quant.get("group_size"),
            "excluded": sorted(quant.get("exclude_modules", [])), "fallback_layers": [],
            "quantized_layers": layers,
            "producer": json.loads((folder / "hf_quant_config.json").read_text())["producer"],
            "weight_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}
