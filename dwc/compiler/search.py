"""`dwc build --target auto | <hardware>`: build every target of a hardware up to its
quality gate and cost prediction, and emit only the winner (docs/SEARCH.md).

Each candidate is one target (its scheme, KV dtype and block size) run through its passes
but `emit`, with `tune` added where the target has a KV plan but no `tune` (tune searches
the concurrency limit and the draft on/off); the pass cache shares what does not depend on
the target (calibrate, and quantize, distill-draft or evaluate where their inputs are the
same). Only the best candidate so far stays in memory; the winner's context is emitted
with the search table in its manifest and reports/search.png.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

from dwc.bundle.reader import read_manifest
from dwc.compiler import ranking
from dwc.compiler.buildfile import Search, load_buildfile
from dwc.compiler.cache import PassCache
from dwc.compiler.hardware import resolve, targets_of
from dwc.compiler.output import OWNER, check_output, remove_abandoned
from dwc.compiler.pipeline import BuildContext, Step, plan, run
from dwc.compiler.reports import json_bytes
from dwc.compiler.ui import Reporter
from dwc.config import from_dict
from dwc.constants import cache_dir
from dwc.errors import DwcError, QualityBudgetExceeded, TargetError
from dwc.model.checkpoint import model_info
from dwc.passes import REGISTRY


def search(build_file: Path, hardware: str, output: Path, overrides=(), use_cache=True,
           force=False, reporter: Reporter | None = None) -> dict:
    """Search the targets of `hardware` (or `auto`); returns the winner's manifest."""
    build_file = Path(build_file)
    config = load_buildfile(build_file, overrides, pass_names=REGISTRY)
    reporter = reporter or Reporter()
    hw = resolve(hardware)
    options = config.search or Search()
    info = model_info(config.model)
    measuring = _measuring(config)
    plans = [(t, *_plan(measuring, t, info)) for t in targets_of(hw, options.targets)]
    output = Path(output).absolute()
    check_output(output, config)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(output)
    cache = PassCache(cache_dir(), enabled=use_cache)
    runnable = sum(1 for _, steps, _ in plans if steps)
    reporter.info(f"search: {len(plans)} target(s) of {hw}, {runnable} to measure, "
                  f"at most {options.max_minutes:g} minutes")
    best, rows, started = None, [], time.monotonic()
    common = dict(build_path=build_file.resolve(), info=info, output=output, force=force,
                  reporter=reporter)
    try:
        for target, steps, why in plans:
            if steps is None:
                rows.append(ranking.row(target, "skipped", why))
                continue
            if time.monotonic() - started > options.max_minutes * 60:
                rows.append(ranking.row(target, "not run", _timeout(options, reporter)))
                continue
            reporter.info(f"search: candidate {len(rows) + 1}/{len(plans)} {target.name} "
                          f"({target.weights.scheme}, KV {target.kv_cache_dtype})")
            ctx, r = _measure(measuring, target, steps, cache, common)
            rows.append(r)
            reporter.info(f"search: {target.name}: {_summary(r)}")
            if ranking.qualifies(r) and (best is None or ranking.rank_key(r) < best[1]):
                best, ctx = (ctx, ranking.rank_key(r), steps[-1]), (best or (None,))[0]
            _discard(ctx)
        record = ranking.decide(rows, config.slo, config.evaluation.max_ppl_increase_pct)
        if best is None:
            raise ranking.no_winner(rows)
        return _emit(best[0], best[2], config, record, cache, reporter)
    finally:
        _discard(best[0] if best else None)


def _measuring(config):
    """The build file the candidates run with: `slo.enforce` off (the search applies
    the SLO itself, to every candidate)."""
    if config.slo is None or not config.slo.enforce:
        return config
    return dataclasses.replace(config, slo=dataclasses.replace(config.slo, enforce=False))


def _plan(config, target, info) -> tuple:
    """(steps, None), or (None, why this target is not a candidate)."""
    try:
        target.check_model(info)
    except TargetError as e:
        return None, f"cannot compile this model: {e.message}"
    names = list(target.passes) if config.optimization == "auto" else list(config.optimization)
    if "kv-layout" not in names:
        return None, ("no cost prediction: the cost model covers dwc's runtime's KV plan, "
                      f"which {target.backend} bundles do not have")
    mine = {k: v for k, v in config.passes.items() if k not in REGISTRY or k in names}
    steps = plan(dataclasses.replace(config, passes=mine), target, REGISTRY)
    if "tune" not in names:
        tune = REGISTRY["tune"]
        steps.insert(len(steps) - 1, Step(tune(), from_dict(
            tune.Options, config.passes.get("tune", {}), "passes.tune")))
    return steps, None


def _measure(config, target, steps, cache, common) -> tuple:
    """Run the candidate's passes but emit; (its context, its row)."""
    work = Path(tempfile.mkdtemp(prefix=f".{common['output'].name}.work-",
                                 dir=common["output"].parent))
    (work / OWNER).write_text(str(os.getpid()))
    ctx = BuildContext(build=config, target=target, workdir=work, **common)
    t0, failed = time.perf_counter(), None
    try:
        run(steps[:-1], ctx, cache)
    except QualityBudgetExceeded as e:
        ctx.artifacts.quality = dict(ctx.artifacts.quality or {}, reason=e.message)
    except DwcError as e:
        failed = f"failed: {e.message}"
    r = ranking.measured_row(target, ctx.artifacts.quality, ctx.artifacts.tuning, failed,
                             config.slo)
    r.update(seconds=round(time.perf_counter() - t0, 3),
             cached_passes=[rec.name for rec in ctx.records if rec.cached])
    return ctx, r


def _emit(ctx, emit_step, config, record: dict, cache, reporter) -> dict:
    reporter.info(f"search: winner {record['winner']}; writing its bundle")
    ctx.build = config  # the manifest records the build file as written (slo.enforce)
    ctx.search = record
    ctx.reports["search.json"] = json_bytes(record)
    ctx.reports["search.png"] = ranking.search_plot(record)
    run([emit_step], ctx, cache)
    return read_manifest(ctx.artifacts.bundle)


def _discard(ctx) -> None:
    if ctx is not None:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


def _timeout(options, reporter) -> str:
    why = f"not started: search.max_minutes ({options.max_minutes:g}) was reached"
    reporter.warn(f"search: {why}")
    return why


def _summary(r: dict) -> str:
    if r["status"] == "failed":
        return r["why"]
    parts = [f"ppl {r['delta_pct']:+.4g}%" if r["delta_pct"] is not None else "no quality"]
    if r["usd_per_million_output_tokens"] is not None:
        parts.append(f"${r['usd_per_million_output_tokens']:.4g}/M tokens, "
                     f"max {r['max_rps']:.4g} rps")
    parts.append("meets budget and SLO" if ranking.qualifies(r) else (r["why"] or ""))
    return ", ".join(parts)
