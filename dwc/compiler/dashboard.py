"""The Grafana dashboard of a bundle served by `dwc serve` (serve/grafana-dashboard.json):
one panel per question, each a PromQL query on the metrics dwc/serving/http_server.py
exports (tests/test_deploy.py checks every name against a live /metrics). Cost is the
pods' $/hour (the target's price, a dashboard variable to edit) over their token rate.
"""

from __future__ import annotations

import re

WINDOW = "5m"
SELECT = '{job="$job"}'  # the ServiceMonitor's job label: the Service's name


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [(f"p{int(q * 100)}", f"histogram_quantile({q}, sum by (le) "
                                  f"(rate({metric}_bucket{SELECT}[{WINDOW}])))")
            for q in (0.5, 0.99)]


def _tokens_per_s() -> str:
    return f"sum(rate(dwc_output_tokens_total{SELECT}[{WINDOW}]))"


def _pods() -> str:
    return f"count(dwc_queue_depth{SELECT})"


# (title, unit, [(legend, query)]): the dashboard's panels, in reading order.
PANELS = [
    ("Time to first token", "s", _quantiles("dwc_time_to_first_token_seconds")),
    ("Time per output token", "s", _quantiles("dwc_time_per_output_token_seconds")),
    ("Requests waiting and running", "short", [
        ("waiting", f"sum(dwc_queue_depth{SELECT})"),
        ("running", f"sum(dwc_running_sequences{SELECT})")]),
    ("Replicas", "short", [("pods", _pods())]),
    ("KV cache in use", "percentunit", [
        ("blocks used / blocks", f"sum(dwc_kv_blocks_used{SELECT}) / "
                                 f"sum(dwc_kv_blocks_total{SELECT})")]),
    ("Prefix cache hit rate", "percentunit", [
        ("prompt tokens from the cache", f"avg(dwc_prefix_cache_hit_rate{SELECT})")]),
    ("Host-memory KV tier", "short", [
        ("prompt tokens/s from host memory",
         f"sum(rate(dwc_kv_host_hit_tokens{SELECT}[{WINDOW}]))"),
        ("prefill seconds saved /s",
         f"sum(rate(dwc_kv_host_prefill_seconds_saved{SELECT}[{WINDOW}]))")]),
    ("Speculative decoding", "short", [
        ("acceptance rate", f"avg(dwc_spec_acceptance_rate{SELECT})"),
        ("tokens per step", f"avg(dwc_spec_tokens_per_step{SELECT})")]),
    ("Output tokens per second", "short", [("tokens/s", _tokens_per_s())]),
    ("$ per million output tokens", "currencyUSD", [
        ("$ / 1M tokens", f"$usd_per_hour * {_pods()} * 1e6 / (3600 * {_tokens_per_s()})")]),
]


def _panel(i: int, title: str, unit: str, queries: list) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for j, (legend, expr) in enumerate(queries)],
    }


def _textbox(name: str, label: str, value: str) -> dict:
    return {"type": "textbox", "name": name, "label": label, "query": value,
            "current": {"text": value, "value": value}}


def dashboard(bundle_name: str, job: str, usd_per_hour: float) -> dict:
    """The dashboard (Grafana's JSON model) for the pods of `job`."""
    return {
        "title": f"dwc: {bundle_name}",
        "uid": re.sub(r"[^a-zA-Z0-9-]", "-", f"dwc-{job}")[:40],
        "tags": ["dwc"], "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Prometheus",
             "query": "prometheus"},
            _textbox("job", "Service (Prometheus job)", job),
            _textbox("usd_per_hour", "$ per hour per replica", f"{usd_per_hour:g}"),
        ]},
        "panels": [_panel(i, *p) for i, p in enumerate(PANELS)],
    }


def queried_metrics(board: dict) -> set[str]:
    """The metric names the dashboard's queries read (as they appear in /metrics)."""
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\b(dwc_[a-z_]+)\{", e)}
