"""`emit`: write the bundle (model/, reports/, README.md, manifest.json) atomically.

The backend's emitter writes model/ in its layout; report files gathered from earlier
passes go to reports/; README.md is rendered from templates/, and so are a GPU bundle's
Kubernetes manifests in serve/ (with its Grafana dashboard: dwc/compiler/deploy.py). Everything is staged in a
temporary folder next to the output and renamed into place only when complete.
"""

from __future__ import annotations

import time

from dwc import backends
from dwc.bundle.draft import write_draft
from dwc.bundle.writer import BundleWriter
from dwc.config import options_dict
from dwc.formats import manifest as mf
from dwc.compiler.deploy import serve_files
from dwc.compiler.manifest import build_manifest
from dwc.passes.base import Pass, PassResult
from dwc.compiler.templating import render


class Emit(Pass):
    name = "emit"
    description = ("Write the bundle for the target's backend: model/, reports/, README.md "
                   "and manifest.json with the sha256 of every file, atomically.")
    reads = ("model", "tokenizer", "source", "quality")
    optional_reads = ("calibration", "quantized", "draft", "draft_model", "kv_plan", "tuning")
    writes = ("bundle",)

    def run(self, ctx, options) -> PassResult:
        t0 = time.perf_counter()
        backend = backends.get(ctx.target.backend)
        with BundleWriter(ctx.output, force=ctx.force) as writer:
            backend.emit(writer, ctx)
            if ctx.artifacts.draft_model is not None:
                write_draft(writer, ctx.artifacts.draft_model, ctx.info.path)
            for name, data in sorted(ctx.reports.items()):
                writer.write_bytes(f"{mf.REPORTS_DIR}/{name}", data)
            record = {"name": self.name, "options": options_dict(options),
                      "seconds": round(time.perf_counter() - t0, 3), "cached": False,
                      "metrics": {}}
            manifest = build_manifest(ctx, record)
            for name, text in serve_files(manifest).items():  # GPU bundles: docs/DEPLOY.md
                writer.write_bytes(f"{mf.SERVE_DIR}/{name}", text.encode())
            vllm = backend.alternative_serving(manifest)
            readme = render("bundle_README.md.j2", m=manifest, model_dir=mf.MODEL_DIR,
                            reports_dir=mf.REPORTS_DIR, vllm=vllm,
                            spec=mf.speculation(manifest["draft"]))
            writer.write_bytes(mf.README, readme.encode())
            manifest = writer.finalize(manifest)
            path = writer.commit()
        size = sum(f["bytes"] for f in manifest["files"].values())
        return PassResult(outputs={"bundle": path},
                          metrics={"files": len(manifest["files"]), "bytes": size})
