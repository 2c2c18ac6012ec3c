"""`gguf-export`: the model as one GGUF file for llama.cpp, quantized by llama.cpp itself.

Writes the model (the source weights, with a LoRA adapter merged by `load`) as F16 GGUF
in llama.cpp's conventions (dwc/backends/gguf/file.py), after choosing the pre-tokenizer
name under which llama.cpp tokenizes the evaluation text exactly as the Hugging Face
tokenizer does; then, for Q8_0 / Q4_K_M targets, runs llama.cpp's quantizer with an
importance matrix made from the `calibrate` pass's per-column mean squared activations
(dwc/backends/gguf/llama.py). The `evaluate` pass then runs this very file in llama.cpp.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dwc.config import option
from dwc.errors import TargetError
from dwc.bundle.hashing import sha256_file
from dwc.passes.base import Pass, PassResult

GGUF_FOLDER = "gguf"
SUMMARY = "summary.json"


@dataclass
class GgufOptions:
    imatrix: bool = option(True, help="quantize K-quants with the calibration imatrix")


@dataclass
class GgufModel:
    """The GGUF file on disk and what it is (for evaluate, emit and the manifest)."""

    folder: Path
    summary: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder / "model.gguf"

    def describe(self) -> str:
        s = self.summary
        return f"GGUF {s['ggml_type']}" + (" with imatrix" if s["imatrix"] else "")


class GgufExport(Pass):
    name = "gguf-export"
    description = ("Write the model as GGUF for llama.cpp (llama / qwen2 conventions, "
                   "tokenizer embedded) and quantize it with llama.cpp's own quantizer "
                   "(Q8_0, Q4_K_M with the calibration imatrix).")
    reads = ("model", "tokenizer")
    optional_reads = ("calibration",)
    writes = ("quantized",)
    Options = GgufOptions
    cacheable = True
    lossy = True

    def key_material(self, ctx, options):
        from importlib.metadata import version

        # The file depends on the writer's and llama.cpp's versions (quantizer, known
        # pre-tokenizers), the build's name (general.name) and the probe text.
        return {"type": ctx.target.weights.scheme, "name": ctx.build.name,
                "evaluation": sha256_file(ctx.build.evaluation.data),
                "gguf": version("gguf"), "llama_cpp": version("llama-cpp-python"), "version": 2}

    def run(self, ctx, options) -> PassResult:
        from dwc.backends.gguf import llama as backend
        from dwc.backends.gguf import file as gguf_file
        from dwc.backends.gguf import pretokenizer

        model = ctx.artifacts.model
        ggml_type = ctx.target.weights.scheme.removeprefix("gguf-")
        folder = ctx.workdir / GGUF_FOLDER
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        config = model.config.to_dict()
        text = Path(ctx.build.evaluation.data).read_text(encoding="utf-8")[:50_000]
        pre = pretokenizer.choose_pre_tokenizer(config, ctx.info.path, text, folder)
        if pre is None:
            raise TargetError(f"{ctx.info.path}: llama.cpp tokenizes the evaluation text "
                              "differently from the Hugging Face tokenizer under every "
                              "pre-tokenizer it knows; this tokenizer cannot be a GGUF bundle")
        f16 = folder / ("model.gguf" if ggml_type == "f16" else "model-f16.gguf")
        gguf_file.write_f16_gguf(model, ctx.info.path, f16, ctx.build.name, pre)
        stats = ctx.artifacts.calibration
        # Only the K-quants weigh rounding errors by the imatrix (Q8_0 ignores it).
        imatrix = backend.imatrix_entries(stats.mean_sq) \
            if options.imatrix and stats is not None and ggml_type in backend.USES_IMATRIX \
            else None
        if ggml_type != "f16":
            backend.quantize(f16, folder / "model.gguf", ggml_type, imatrix)
            f16.unlink()
        summary = _summary(folder / "model.gguf", ggml_type, pre, imatrix)
        return PassResult(outputs={"quantized": GgufModel(folder, summary)},
                          metrics={"ggml_type": ggml_type, "imatrix": bool(imatrix),
                                   "pre_tokenizer": pre, "bytes": summary["weight_bytes"]})

    def save(self, outputs, folder: Path) -> None:
        g = outputs["quantized"]
        shutil.copytree(g.folder, folder / GGUF_FOLDER)
        (folder / SUMMARY).write_text(json.dumps(g.summary))

    def load(self, folder: Path, ctx) -> dict:
        return {"quantized": GgufModel(folder / GGUF_FOLDER,
                                       json.loads((folder / SUMMARY).read_text()))}


def _summary(path: Path, ggml_type: str, pre: str, imatrix) -> dict:
    """What the manifest says of the file: the tensor types llama.cpp chose per tensor
    (Q4_K_M mixes Q4_K and Q6_K, and falls back where a row does not split into 256s)."""
    from collections import Counter

    import gguf

    types = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return {"scheme": f"gguf-{ggml_type}", "method": "llama.cpp quantize", "format": "gguf",
            "ggml_type": ggml_type.upper(), "tensor_types": dict(sorted(types.items())),
            "imatrix": bool(imatrix), "imatrix_tensors": len(imatrix or {}),
            "pre_tokenizer": pre, "excluded": [], "fallback_layers": [],
            "weight_bytes": path.stat().st_size}
