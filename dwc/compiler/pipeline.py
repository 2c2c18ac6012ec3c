"""The pass manager: plan the passes, check their order, run them, cache their results.

`plan()` turns the build file and target into an ordered list of (pass, options) and
checks, before anything runs, that each pass's reads are written by an earlier pass.
`run()` executes the plan; a failure names the pass and the passes already run.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dwc.compiler.artifacts import ARTIFACTS, Artifacts
from dwc.constants import VERSION as __version__
from dwc.compiler.buildfile import BuildFile
from dwc.compiler.cache import METRICS, PassCache
from dwc.model.checkpoint import ModelInfo
from dwc.config import from_dict, options_dict
from dwc.errors import BuildFileError, DwcError, PassFailed
from dwc.bundle.hashing import sha256_json
from dwc.passes.base import PassResult
from dwc.compiler.target import Target
from dwc.compiler.ui import Reporter

# Every pipeline starts by loading, measures quality, and ends by writing the bundle.
REQUIRED = ("load", "evaluate", "emit")


@dataclass
class PassRecord:
    name: str
    options: dict
    seconds: float
    cached: bool
    metrics: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BuildContext:
    build: BuildFile
    build_path: Path
    target: Target
    info: ModelInfo
    output: Path
    workdir: Path  # scratch space for this build, removed when it ends
    force: bool = False
    reporter: Reporter = field(default_factory=Reporter)
    artifacts: Artifacts = field(default_factory=Artifacts)
    fingerprints: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, list[str]] = field(default_factory=dict)  # artifact -> lossy writers
    records: list[PassRecord] = field(default_factory=list)
    reports: dict[str, bytes] = field(default_factory=dict)
    search: dict | None = None  # the candidates of a search (docs/SEARCH.md)
    started: float = field(default_factory=time.perf_counter)

    @property
    def compute_device(self) -> str:
        """Where passes run models: the GPU when there is one, else the CPU (small models)."""
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Step:
    pass_: Any
    options: Any


def plan(build: BuildFile, target: Target, registry: dict) -> list[Step]:
    names = list(target.passes) if build.optimization == "auto" else list(build.optimization)
    if build.draft == "none":
        names = [n for n in names if n != "distill-draft"]
    where = "optimization" if build.optimization != "auto" else f"target {target.name} passes"
    for name in names:
        if name not in registry:
            raise BuildFileError(f"{where}: unknown pass {name!r} (known: {', '.join(registry)})")
    if len(set(names)) != len(names):
        raise BuildFileError(f"{where}: a pass is listed twice ({', '.join(names)})")
    for name in REQUIRED:
        if name not in names:
            raise BuildFileError(f"{where}: the pipeline must include {name!r}")
    if names[-1] != "emit":
        raise BuildFileError(f"{where}: the pipeline must end with 'emit'")
    for name in build.passes:
        if name not in names:
            raise BuildFileError(f"passes.{name}: not a pass of this pipeline ({', '.join(names)})")
    steps = [Step(registry[n](), from_dict(registry[n].Options, build.passes.get(n, {}),
                                           f"passes.{n}")) for n in names]
    check_order(steps, where)
    return steps


def check_order(steps: list[Step], where: str = "pipeline") -> None:
    written: set[str] = set()
    for i, step in enumerate(steps):
        for artifact in step.pass_.reads:
            if artifact not in written:
                before = ", ".join(s.pass_.name for s in steps[:i]) or "none"
                raise BuildFileError(f"{where}: pass {step.pass_.name!r} reads {artifact!r}, "
                                     f"which no earlier pass writes (earlier: {before})")
        written.update(step.pass_.writes)


def run(steps: list[Step], ctx: BuildContext, cache: PassCache) -> None:
    for i, step in enumerate(steps, 1):
        p = step.pass_
        ctx.reporter.pass_started(p.name, i, len(steps))
        t0 = time.perf_counter()
        try:
            key = cache_key(p, step.options, ctx)
            result, cached = _run_or_restore(p, step.options, ctx, cache, key)
            _publish(p, result, ctx, key)
            p.after(ctx, step.options, result)
        except DwcError as e:
            e.pass_name = e.pass_name or p.name
            raise
        except Exception as e:  # a bug or an environment failure inside a pass
            done = ", ".join(r.name for r in ctx.records) or "none"
            raise PassFailed(f"pass {p.name!r} failed (passes run: {done}): "
                             f"{type(e).__name__}: {e}", pass_name=p.name) from e
        seconds = time.perf_counter() - t0
        ctx.records.append(PassRecord(p.name, options_dict(step.options), round(seconds, 3),
                                      cached, result.metrics))
        ctx.reporter.pass_finished(p.name, seconds, cached, _summary(result.metrics))


def cache_key(p, options, ctx: BuildContext) -> str:
    import torch
    import transformers

    reads = p.reads + tuple(a for a in p.optional_reads if a in ctx.fingerprints)
    return sha256_json({
        "dwc": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": ctx.compute_device,
        "pass": p.name, "options": options_dict(options),
        "reads": {a: ctx.fingerprints[a] for a in reads}, "extra": p.key_material(ctx, options),
    })


def _run_or_restore(p, options, ctx: BuildContext, cache: PassCache, key: str):
    folder = cache.lookup(p.name, key) if p.cacheable else None
    if folder is not None:
        reports = {f.name: f.read_bytes() for f in sorted((folder / "reports").glob("*"))}
        metrics = json.loads((folder / METRICS).read_text())
        return _restored(p.load(folder / "outputs", ctx), metrics, reports), True
    result = p.run(ctx, options)
    if p.cacheable:
        def write(tmp: Path) -> None:
            (tmp / "outputs").mkdir()
            (tmp / "reports").mkdir()
            p.save(result.outputs, tmp / "outputs")
            for name, data in result.reports.items():
                (tmp / "reports" / name).write_bytes(data)
            (tmp / METRICS).write_text(json.dumps(result.metrics, sort_keys=True))
        cache.store(p.name, key, write)
    return result, False


def _restored(outputs, metrics, reports) -> PassResult:
    return PassResult(outputs=outputs, metrics=metrics, reports=reports)


def _publish(p, result, ctx: BuildContext, key: str) -> None:
    missing = set(p.writes) - set(result.outputs)
    if missing:
        raise RuntimeError(f"pass {p.name} did not write {sorted(missing)}")
    for name, value in result.outputs.items():
        if name not in ARTIFACTS:  # a field of Artifacts, not a new attribute
            raise RuntimeError(f"pass {p.name} wrote {name!r}, which is not an artifact")
        setattr(ctx.artifacts, name, value)
        ctx.fingerprints[name] = sha256_json([key, name])
        upstream = sorted({w for a in p.reads + p.optional_reads for w in ctx.lineage.get(a, [])})
        ctx.lineage[name] = upstream + ([p.name] if p.lossy else [])
    ctx.reports.update(result.reports)


def _summary(metrics: dict) -> str:
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return "  ".join(shown[:4])
