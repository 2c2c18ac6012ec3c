"""The search's table: one row per candidate target, the winner, why each other lost, the
error when none wins, and reports/search.png (docs/SEARCH.md).

A row meets the quality budget when `evaluate`'s gate passed, and the SLO when `tune`
found a request rate at which the predicted (or, on the target's GPU, measured) p99s are
inside the limits; a `target_rps` above one device's rate is met with more replicas, which
the row records. The winner is the row that meets both with the lowest predicted $ per
million output tokens; ties go to the smaller perplexity increase.
"""

from __future__ import annotations

from dwc.errors import QualityBudgetExceeded, SloNotMet

# A row's keys, in the order the manifest's `search.candidates` and the tables show them.
ROW_KEYS = ("target", "backend", "scheme", "kv_cache", "status", "delta_pct", "kl_divergence",
            "meets_quality", "max_num_seqs", "draft", "tpot_p99_ms", "ttft_p99_ms", "max_rps",
            "replicas", "usd_per_million_output_tokens", "meets_slo", "why", "seconds",
            "cached_passes")


def row(target, status: str, why: str | None = None) -> dict:
    base = dict.fromkeys(ROW_KEYS)
    base.update(target=target.name, backend=target.backend, scheme=target.weights.scheme,
                kv_cache=target.kv_cache_dtype, status=status, why=why)
    return base


def measured_row(target, quality: dict | None, tuning: dict | None, failed: str | None,
                 slo=None) -> dict:
    """A candidate that ran: its gate's figures and tune's prediction for its choice."""
    r = row(target, "measured")
    if quality:
        r.update(delta_pct=quality["delta_pct"], kl_divergence=quality.get("kl_divergence"),
                 meets_quality=bool(quality.get("passed")))
    if tuning:
        p = tuning["predicted"]
        met = p["max_rps"] > 0 and tuning.get("confirmed") is not False
        r.update(max_num_seqs=tuning["chosen"]["max_num_seqs"], draft=tuning["chosen"]["draft"],
                 tpot_p99_ms=p.get("tpot_p99_ms"), ttft_p99_ms=p.get("ttft_p99_ms"),
                 max_rps=p["max_rps"], replicas=tuning.get("replicas"),
                 usd_per_million_output_tokens=_cost(target, p), meets_slo=met)
        if not met:
            r["slo_miss"] = tuning.get("reason") or "the SLO is not met at any rate"
            r["slo_ratio"] = _miss_ratio(tuning, slo)
    if failed:
        r.update(status="failed", why=failed)
    elif r["meets_quality"] is False:
        r["why"] = f"quality: {quality.get('reason') or _quality_miss(quality)}"
    elif r["meets_slo"] is False:
        r["why"] = f"slo: {r['slo_miss']}"
    return r


def _cost(target, predicted: dict) -> float | None:
    """$ per million output tokens at the predicted rate, to 6 significant digits (tune
    rounds its figure to 4 decimals, which ties small models' schemes)."""
    from dwc.perf.costmodel import usd_per_million_tokens

    tok_s = predicted.get("output_tok_s")
    if not tok_s:
        return None
    return float(f"{usd_per_million_tokens(target.hardware.usd_per_hour, tok_s):.6g}")


def rank_key(r: dict) -> tuple:
    return (r["usd_per_million_output_tokens"], r["delta_pct"], r["target"])


def qualifies(r: dict) -> bool:
    return r["status"] == "measured" and bool(r["meets_quality"]) and bool(r["meets_slo"])


def decide(rows: list[dict], slo, budget_pct: float) -> dict:
    """Mark the winner and why each other measured row lost; the manifest's `search`."""
    ok = sorted((r for r in rows if qualifies(r)), key=rank_key)
    winner = ok[0] if ok else None
    for r in ok:
        if r is winner:
            r["status"] = "winner"
        else:
            r["status"] = "lost"
            r["why"] = _lost_to(r, winner)
    for r in rows:
        if r["status"] == "measured":
            r["status"] = "lost"
    return {"winner": winner["target"] if winner else None,
            "rule": "lowest predicted $ per million output tokens that meets the quality "
                    "budget and the SLO; ties go to the smaller perplexity increase",
            "budget_pct": budget_pct, "slo": vars(slo) | {} if slo else None,
            "candidates": [{k: r[k] for k in ROW_KEYS} for r in rows]}


def _lost_to(r: dict, winner: dict) -> str:
    a, b = r["usd_per_million_output_tokens"], winner["usd_per_million_output_tokens"]
    if a > b:
        return f"costs ${a:.6g} per million output tokens, {winner['target']} ${b:.6g}"
    return (f"ties {winner['target']} at ${a:.6g} per million output tokens with a larger "
            f"perplexity increase ({r['delta_pct']:.4g}% vs {winner['delta_pct']:.4g}%)")


def no_winner(rows: list[dict]):
    """The error when no row meets both: exit 3 when none meets the quality budget (the
    closest is the smallest perplexity increase), else exit 4 (the closest is the quality
    row that misses its latency limits by the smallest factor)."""
    measured = [r for r in rows if r["meets_quality"] is not None]
    if not measured:
        whys = "; ".join(f"{r['target']}: {r['why']}" for r in rows)
        return QualityBudgetExceeded(f"search: no candidate was measured ({whys})")
    good = [r for r in measured if r["meets_quality"]]
    if not good:
        c = min(measured, key=lambda r: r["delta_pct"])
        return QualityBudgetExceeded(f"search: no candidate meets the quality budget; the "
                                     f"closest, {c['target']}, missed it: {c['why']}")
    with_tune = [r for r in good if r.get("slo_ratio") is not None] or good
    c = min(with_tune, key=lambda r: r.get("slo_ratio") or float("inf"))
    return SloNotMet(f"search: no candidate meets the SLO within the quality budget; the "
                     f"closest, {c['target']}, missed it: {c['why'] or 'no tune prediction'}")


def _quality_miss(q: dict) -> str:
    return f"perplexity +{q['delta_pct']:.4g}% > budget {q.get('budget_pct')}%"


def _miss_ratio(tuning: dict, slo) -> float:
    """How far a candidate is from its latency limits: the smallest, over tune's
    configurations, of the largest p99 / limit at the lowest rate (1.0 when the limits
    are met and only the confirming measurement missed)."""
    limits = {"tpot_p99_ms": slo and slo.target_latency_ms, "ttft_p99_ms": slo and slo.target_ttft_ms}
    ratios = [max([c["alone"][k] / v for k, v in limits.items() if v] or [1.0])
              for c in tuning["candidates"] if c.get("alone")]
    return min(ratios, default=1.0)


def search_plot(record: dict) -> bytes:
    """Perplexity increase (%) against predicted $ per million output tokens, one labelled
    point per measured candidate, the winner marked, the quality budget as a line."""
    from dwc.compiler.reports import scatter_chart

    points = [(r["usd_per_million_output_tokens"], r["delta_pct"], r["target"],
               r["status"] == "winner")
              for r in record["candidates"]
              if r["usd_per_million_output_tokens"] is not None and r["delta_pct"] is not None]
    return scatter_chart(points, title="Search: quality against cost",
                         xlabel="predicted $ per million output tokens",
                         ylabel="perplexity increase, %", hline=record.get("budget_pct"),
                         hline_label="quality budget")
