"""Assembling manifest.json's content from a finished build context (README.md, "The
bundle")."""

from __future__ import annotations

import platform
import socket
import sys
import time
from datetime import datetime, timezone

from dwc.constants import VERSION as __version__
from dwc.formats import manifest as mf
from dwc.bundle.hashing import sha256_file


def serving_facts(ctx) -> dict:
    """The manifest keys a serving command is made from (name, draft, kv_cache), for a
    backend's emit, which runs before the manifest exists."""
    return {"name": ctx.build.name, "draft": ctx.artifacts.draft,
            "kv_cache": ctx.artifacts.kv_plan or
            {"dtype": ctx.target.kv_cache_dtype, "plan": None}}


def build_manifest(ctx, emit_record: dict) -> dict:
    """Every manifest key but `files` (the bundle writer adds those when it hashes)."""
    b, t = ctx.build, ctx.target
    source = dict(ctx.artifacts.source)
    source["build_file"] = {"path": str(ctx.build_path), "sha256": sha256_file(ctx.build_path)}
    source["calibration_data"] = _data(b.calibration.data)
    source["evaluation_data"] = _data(b.evaluation.data)
    facts = serving_facts(ctx)
    return {
        "schema": mf.SCHEMA,
        "dwc_version": __version__,
        "name": facts["name"],
        "target": {"name": t.name, "backend": t.backend, "device": t.device,
                   "hardware": vars(t.hardware) | {}},
        "source": source,
        "passes": [r.as_dict() for r in ctx.records] + [emit_record],
        "quantization": _quantization(ctx),
        "draft": facts["draft"],
        "fusion": ctx.artifacts.fusion,
        "kv_cache": facts["kv_cache"],
        "quality": ctx.artifacts.quality,
        "slo": _slo(ctx),
        "search": ctx.search,
        "build": _build_info(ctx),
    }


def _slo(ctx) -> dict | None:
    """The build file's SLO and, after `tune`, the predicted figures and the decision."""
    tuning = ctx.artifacts.tuning
    if not ctx.build.slo and not tuning:
        return None
    slo = vars(ctx.build.slo) | {} if ctx.build.slo else {}
    if tuning:
        slo |= {k: tuning[k] for k in ("predicted", "chosen", "replicas", "meets_slo", "reason")}
        if "measured" in tuning:  # on the target's GPU: the choice measured at its rate
            slo["measured"] = {k: tuning["measured"][k] for k in ("rps", "requests", "ttft_ms",
                                                                  "tpot_ms", "completed_rps_while_arriving")}
            slo["confirmed"] = tuning["confirmed"]
    return slo


def _quantization(ctx) -> dict:
    t = ctx.target
    base = {"scheme": t.weights.scheme, "weight_dtype": t.weights.dtype,
            "activation_dtype": t.weights.dtype, "excluded": []}
    quantized = ctx.artifacts.quantized
    return base | quantized.summary if quantized is not None else base


def _data(path) -> dict:
    return {"path": str(path), "sha256": sha256_file(path)}


def _build_info(ctx) -> dict:
    """The one volatile field: when, where and with what the bundle was built."""
    import torch
    import transformers

    return {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "seconds": round(time.perf_counter() - ctx.started, 3),
        "python": platform.python_version(),
        "platform": sys.platform,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
