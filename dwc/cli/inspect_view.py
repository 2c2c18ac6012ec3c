"""Human-readable views of manifests, targets and passes (rich tables on stdout)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

_OUT = Console(highlight=False)


def table(title: str, rows: list[dict], columns: list[str]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*(_fmt(row.get(c)) for c in columns))
    _OUT.print(t)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show_manifest(m: dict, bundle: Path) -> None:
    t, s, q = m["target"], m["source"], m["quality"]
    hw = t["hardware"]
    total = sum(f["bytes"] for f in m["files"].values())
    _OUT.print(f"[bold]{m['name']}[/]  ({bundle})  dwc {m['dwc_version']}, schema {m['schema']}")
    _OUT.print(f"target     {t['name']}: {t['backend']} on {hw['name']} "
               f"({hw['memory_gb']} GB, ${hw['usd_per_hour']}/h)")
    adapter = f", LoRA {s['adapter']['path']} merged" if s.get("adapter") else ""
    _OUT.print(f"source     {s['model']['path']} ({s['architecture']}, "
               f"{s['parameters']:,} parameters, {s['stored_dtype']}{adapter})")
    quant = m["quantization"]
    _OUT.print(f"weights    {quant['scheme']} ({quant['weight_dtype']}); "
               f"KV cache {m['kv_cache']['dtype']}; speculation {_speculation(m['draft'])}")
    f = m.get("fusion")
    if f:
        on = [k for k, v in f["plan"].items() if v] or ["none"]
        _OUT.print(f"fusion     {', '.join(on)} (checked on {f['check']['device']}: top-1 "
                   f"agreement {f['check']['top1_agreement']}, max logit diff "
                   f"{f['check']['max_logit_diff']})")
    verdict = "[green]passed[/]" if q["passed"] else "[red]FAILED[/]"
    _OUT.print(f"quality    perplexity {q['baseline']:.4f} -> {q['optimized']:.4f} "
               f"({q['delta_pct']:+.3f}%, budget {q['budget_pct']}%) {verdict}; "
               f"KL {q['kl_divergence']:.2e}; top-1 agreement {100 * q['top1_agreement']:.2f}%")
    if q.get("task"):
        _OUT.print(f"task       {_task(q['task'])}")
    if m.get("slo"):
        _show_slo(m["slo"])
    if m.get("search"):  # built by --target auto | <hardware>: docs/SEARCH.md
        from dwc.cli.search_view import echo_table

        echo_table(m["search"])
    _OUT.print(f"files      {len(m['files'])} files, {_size(total)}")
    rows = [{"pass": p["name"], "seconds": p["seconds"], "cached": p["cached"],
             "metrics": _metrics(p["metrics"])} for p in m["passes"]]
    table("passes", rows, ["pass", "seconds", "cached", "metrics"])
    groups: dict[str, list[int]] = {}
    for rel, f in m["files"].items():
        top = rel.split("/")[0] if "/" in rel else rel
        groups.setdefault(top, []).append(f["bytes"])
    table("contents", [{"path": k, "files": len(v), "size": _size(sum(v))}
                       for k, v in sorted(groups.items())], ["path", "files", "size"])


def _task(t: dict) -> str:
    """The evaluation task's accuracies, paired test and verdict (docs/QUALITY.md)."""
    low, high = t["ci"]
    colour = "green" if t["equivalent"] else "red" if t["required"] else "yellow"
    return (f"{Path(t['path']).name}: accuracy {t['accuracy_before']:.4f} -> "
            f"{t['accuracy_after']:.4f} (n {t['n']}; lost {t['lost']}, gained {t['gained']}; "
            f"McNemar p {t['mcnemar_p']:.3g}); {t['confidence']:.0%} interval of the "
            f"difference [{low:+.4f}, {high:+.4f}], margin +-{t['margin']}: "
            f"[{colour}]{t['verdict']}[/]{' (required)' if t['required'] else ''}")


def _show_slo(slo_section: dict) -> None:
    """The SLO, what the cost model predicted for it and what was measured."""
    slo = {k: v for k, v in slo_section.items()
           if v is not None and k not in ("predicted", "chosen", "reason", "measured")}
    _OUT.print(f"slo        {slo}")
    p = slo_section.get("predicted")
    if p:
        _OUT.print(f"predicted  {p['max_rps']} rps at p99 TPOT {p['tpot_p99_ms']} ms, TTFT "
                   f"{p['ttft_p99_ms']} ms ({p['prompt_tokens']} in / {p['output_tokens']} "
                   f"out); ${p['usd_per_million_output_tokens']} per million output tokens, "
                   f"${p['usd_per_million_requests']} per million requests (cost model)")
    measured = slo_section.get("measured")
    if measured:
        _OUT.print(f"measured   {measured['rps']} rps ({measured['requests']} requests): p99 "
                   f"TPOT {measured['tpot_ms']['p99']} ms, TTFT {measured['ttft_ms']['p99']} "
                   "ms (dwc bench online, on the target's GPU)")
    if slo_section.get("reason"):
        _OUT.print(f"           [red]{slo_section['reason']}[/]")


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())


def build_summary(m: dict, bundle: Path) -> None:
    q = m["quality"]
    total = sum(f["bytes"] for f in m["files"].values())
    _OUT.print(f"built {bundle} for {m['target']['name']} in {m['build']['seconds']:.1f}s: "
               f"{len(m['files'])} files, {_size(total)}; perplexity {q['baseline']:.4f} -> "
               f"{q['optimized']:.4f} ({q['delta_pct']:+.3f}%, budget {q['budget_pct']}%)")


def show_passes(rows: list[dict]) -> None:
    for p in rows:
        _OUT.print(f"[bold]{p['name']}[/]  {p['description']}")
        reads = ", ".join(p["reads"] + [f"{r}?" for r in p["optional_reads"]]) or "-"
        _OUT.print(f"    reads {reads}; writes {', '.join(p['writes'])}"
                   f"{'; cached' if p['cacheable'] else ''}")
        for o in p["options"]:
            _OUT.print(f"    --set {p['name']}.{o['name']}=<{o['type']}> "
                       f"(default {o['default']}): {o['help']}")


def _speculation(d: dict | None) -> str:
    """The build's measured choice, and what it was chosen over."""
    from dwc.formats.manifest import speculation

    method = speculation(d)
    if method is None:
        losers = ", ".join(f"{c['method']} {c['projected_speedup']}x"
                           for c in (d or {}).get("candidates", ()))
        return f"none (measured: {losers})" if losers else "none"
    size = f"{d['params']:,} parameters, " if "params" in d else ""
    ci = d.get("tau_ci95")
    tau = f"tau {d['mean_accepted_tokens']}" + (f" [{ci[0]}, {ci[1]}]" if ci else "")
    return (f"{method} ({size}K={d['k']}, {tau}, c {d['cost_ratio']}, "
            f"projected {d.get('projected_speedup', '?')}x)")
