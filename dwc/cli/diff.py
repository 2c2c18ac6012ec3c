"""`dwc diff A B`: two bundles side by side, and thresholds that fail a CI step.

Figures come from each bundle's manifest (quality, the evaluation task's accuracy when
both have one, sizes, target price, passes and their options) and, when given, from a
`dwc bench --out` result of each (`bench.json`): throughput, p99 time per output token
and time to first token, and the cost per million output tokens at the measured
throughput (the target's $/hour over tokens per hour).

Thresholds (`--fail-on "ppl>+0.5%,tpot_p99>+5%,cost>+3%"`): `metric>+X%` fails when B is
more than X% above A, `metric<-X%` when more than X% below; without `%` the change is
absolute (`top1<-0.01`). A threshold on a figure the bundles do not have is refused.
When both bundles were built by a search, their candidate tables are shown side by side.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from dwc.errors import BadInput

# name -> (what it is, better when lower)
METRICS = {
    "ppl": ("perplexity of the optimized model", True),
    "ppl_delta_pct": ("perplexity increase over the original, %", True),
    "kl": ("KL divergence from the original, nats/token", True),
    "top1": ("top-1 agreement with the original", False),
    "task_acc": ("evaluation task accuracy of the optimized model", False),
    "task_acc_delta": ("task accuracy after - before (the original's)", False),
    "size": ("bundle bytes", True),
    "weights": ("weight bytes", True),
    "tok_s": ("measured output tokens/s", False),
    "tpot_p99": ("measured p99 time per output token, ms", True),
    "ttft_p99": ("measured p99 time to first token, ms", True),
    "cost": ("$ per million output tokens at the measured throughput", True),
}
_RULE = re.compile(r"^\s*([a-z0-9_]+)\s*([<>])\s*([+-]?\d+(?:\.\d+)?)\s*(%?)\s*$")


@dataclass
class Rule:
    metric: str
    above: bool      # True: fails when B exceeds A by more than `limit`
    limit: float
    relative: bool

    def __str__(self) -> str:
        sign = "+" if self.above else "-"
        return f"{self.metric}{'>' if self.above else '<'}{sign}{abs(self.limit):g}" + \
            ("%" if self.relative else "")


def parse_rules(text: str) -> list[Rule]:
    rules = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _RULE.match(part)
        if not m:
            raise BadInput(f"--fail-on: cannot read {part!r} (expected e.g. ppl>+0.5% or "
                           "top1<-0.01)")
        name, op, value, pct = m.groups()
        if name not in METRICS:
            raise BadInput(f"--fail-on: unknown metric {name!r} (known: {', '.join(METRICS)})")
        rules.append(Rule(name, op == ">", abs(float(value)), pct == "%"))
    return rules


def figures(manifest: dict, bench: dict | None) -> dict:
    """The comparable figures of one bundle (and its bench result)."""
    q = manifest["quality"]
    out = {"ppl": q["optimized"], "ppl_delta_pct": q["delta_pct"], "kl": q["kl_divergence"],
           "top1": q["top1_agreement"],
           "size": sum(f["bytes"] for f in manifest["files"].values()),
           "weights": (manifest.get("quantization") or {}).get("weight_bytes")}
    task = q.get("task")
    if task:
        out |= {"task_acc": task["accuracy_after"], "task_acc_delta": task["difference"]}
    if bench:
        tok_s = bench["offline"]["output_tok_s"] if "offline" in bench else \
            bench.get("generation_tok_s")
        online = bench.get("online") or {}
        out["tok_s"] = tok_s
        out["tpot_p99"] = (online.get("tpot_ms") or {}).get("p99")
        out["ttft_p99"] = (online.get("ttft_ms") or {}).get("p99")
        price = manifest["target"]["hardware"]["usd_per_hour"]
        out["cost"] = price / (tok_s * 3600) * 1e6 if tok_s else None
    return {k: v for k, v in out.items() if v is not None}


def changed_passes(a: dict, b: dict) -> list[dict]:
    """Passes present in one bundle only, or run with other options."""
    pa = {p["name"]: p.get("options", {}) for p in a["passes"]}
    pb = {p["name"]: p.get("options", {}) for p in b["passes"]}
    out = []
    for name in list(dict.fromkeys([*pa, *pb])):
        if name not in pa or name not in pb:
            out.append({"pass": name, "only_in": "A" if name in pa else "B"})
        elif pa[name] != pb[name]:
            keys = sorted(k for k in {*pa[name], *pb[name]} if pa[name].get(k) != pb[name].get(k))
            out.append({"pass": name, "options": {k: [pa[name].get(k), pb[name].get(k)]
                                                  for k in keys}})
    return out


def compare(a: dict, b: dict, bench_a: dict | None, bench_b: dict | None,
            rules: list[Rule]) -> dict:
    fa, fb = figures(a, bench_a), figures(b, bench_b)
    rows = {}
    for name in METRICS:
        if name in fa and name in fb:
            change = fb[name] - fa[name]
            rows[name] = {"a": fa[name], "b": fb[name], "change": round(change, 6),
                          "change_pct": round(100 * change / fa[name], 3) if fa[name] else None}
    failed = []
    for rule in rules:
        row = rows.get(rule.metric)
        if row is None:
            raise BadInput(f"--fail-on {rule}: both bundles need {METRICS[rule.metric][0]}"
                           + (" (pass --bench-a and --bench-b)" if rule.metric in
                              ("tok_s", "tpot_p99", "ttft_p99", "cost") else ""))
        change = row["change_pct"] if rule.relative else row["change"]
        if change is None:
            raise BadInput(f"--fail-on {rule}: A's {rule.metric} is 0, no relative change")
        if (change > rule.limit) if rule.above else (change < -rule.limit):
            failed.append({"rule": str(rule), "change": change})
    from dwc.cli.search_view import side_by_side

    return {"a": {"name": a["name"], "target": a["target"]["name"]},
            "b": {"name": b["name"], "target": b["target"]["name"]},
            "metrics": rows, "passes_changed": changed_passes(a, b),
            "search": side_by_side(a, b), "failed": failed, "passed": not failed}


def read_bench(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not a dwc bench result ({e})") from None
