"""`dwc bench` on a torch-triton bundle: offline throughput and online latency through
dwc's runtime (dwc/perf/bench.py), against the bundle's SLO, with its cost."""

from __future__ import annotations

from pathlib import Path

from dwc.backends.base import BenchRun


def bench_run(bundle: Path, manifest: dict, cfg, speculation: str) -> BenchRun:
    from dwc.perf.bench import against_slo, cost, offline, online
    from dwc.runtime.engine import Engine

    engine = Engine.from_bundle(bundle, speculative=speculation != "none",
                                ngram=speculation == "ngram")
    result = {"bundle": str(bundle), "device": engine.runner.device,
              "offline": offline(engine, cfg), "online_levels": []}
    for rps in cfg.rps_levels:
        cfg.rps = rps
        result["online_levels"].append(online(engine, cfg))
    result["online"] = max(result["online_levels"], key=lambda r: r["rps"])
    result["slo"] = against_slo(manifest.get("slo"), result)
    result["speculation"] = engine.speculation()  # over the whole run; None without a draft
    off = result["offline"]
    result["cost"] = cost(manifest["target"]["hardware"]["usd_per_hour"], off["output_tok_s"],
                          off["prompts"] / off["seconds"])
    return BenchRun(result, _lines(result), {"latency.png": _latency_chart(result)})


def _latency_chart(result: dict) -> bytes:
    from dwc.compiler.reports import line_chart

    levels = result["online_levels"]
    return line_chart(
        {"TTFT p99 (ms)": [r["ttft_ms"]["p99"] for r in levels],
         "TPOT p99 (ms)": [r["tpot_ms"]["p99"] for r in levels]},
        title="Latency against load (" + ", ".join(f"{r['rps']} rps" for r in levels) + ")",
        xlabel="load level", ylabel="ms")


def _lines(result: dict) -> list[str]:
    off = result["offline"]
    base = off.get("transformers_output_tok_s")
    lines = [f"offline  {off['prompts']} x {off['input_len']} in / {off['output_len']} out: "
             f"{off['output_tok_s']} output tok/s" + (f" (transformers {base})" if base else "")]
    for r in result["online_levels"]:
        lines.append(f"online   {r['rps']} rps (achieved {r['achieved_rps']}): TTFT p50/p99 "
                     f"{r['ttft_ms']['p50']}/{r['ttft_ms']['p99']} ms, TPOT p50/p99 "
                     f"{r['tpot_ms']['p50']}/{r['tpot_ms']['p99']} ms")
    spec = result["speculation"]
    if spec:
        lines.append(f"speculate {spec['method']} K={spec['k']}: acceptance "
                     f"{spec['acceptance_rate']}, "
                     f"{spec['mean_accepted_tokens']} tokens per verification step")
    for name, check in (result["slo"] or {}).items():
        lines.append(f"slo      {name} {check['target']}: p99 {check['measured_p99']} ms "
                     f"{'met' if check['met'] else 'NOT met'}")
    c = result["cost"]
    lines.append(f"cost     ${c['usd_per_million_output_tokens']} per million output tokens, "
                 f"${c['usd_per_million_requests']} per million requests "
                 f"(offline throughput, ${c['usd_per_hour']}/h)")
    return lines
