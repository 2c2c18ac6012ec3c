"""`dwc diff` and the cost figures: arithmetic against hand-computed values, thresholds
that pass and fail (exit 1), refused rules (exit 2)."""

from __future__ import annotations

import json

import pytest

from dwc.perf.bench import cost
from dwc.cli.diff import parse_rules
from tests.conftest import assert_clean_error, dwc


def test_cost_arithmetic():
    # $3.00/h = $0.000833.../s; 1,000 tok/s -> $0.8333 per million tokens;
    # 2 requests/s -> $416.67 per million requests
    c = cost(3.0, 1000.0, 2.0)
    assert c["usd_per_million_output_tokens"] == pytest.approx(0.8333, abs=1e-4)
    assert c["usd_per_million_requests"] == pytest.approx(416.67, abs=0.01)


def bench_file(tmp_path, name: str, tok_s: float, tpot: float) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"offline": {"output_tok_s": tok_s},
                                "online": {"tpot_ms": {"p99": tpot}, "ttft_ms": {"p99": 50.0}}}))
    return str(path)


def test_same_bundle_no_change_and_cost_from_bench(bundle, tmp_path):
    a = bench_file(tmp_path, "a", 100.0, 20.0)
    b = bench_file(tmp_path, "b", 80.0, 21.0)
    result = dwc("diff", bundle, bundle, "--bench-a", a, "--bench-b", b, "--json",
                 "--fail-on", "ppl>+0.5%,kl>+1%,size>+0%")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["metrics"]["ppl"]["change"] == 0 and data["passes_changed"] == []
    # cpu-bf16 is priced $0.10/h: 100 tok/s -> 0.1 / 3600 / 100 * 1e6 = $0.2778 per million
    assert data["metrics"]["cost"]["a"] == pytest.approx(0.2778, abs=1e-4)
    assert data["metrics"]["cost"]["change_pct"] == pytest.approx(25.0, abs=0.01)
    assert data["metrics"]["tpot_p99"]["change_pct"] == pytest.approx(5.0)
    failed = dwc("diff", bundle, bundle, "--bench-a", a, "--bench-b", b, "--json",
                 "--fail-on", "cost>+3%,tpot_p99>+5%,tok_s<-10%")
    assert failed.exit_code == 1
    rules = [f["rule"] for f in json.loads(failed.stdout)["failed"]]
    assert rules == ["cost>+3%", "tok_s<-10%"]  # tpot +5.0% is not more than 5%


def test_threshold_across_backends_and_changed_passes(bundle, build_for):
    q4 = build_for("cpu-gguf-q4_k_m")
    result = dwc("diff", bundle, q4, "--json", "--fail-on", "kl>+10%")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["failed"][0]["rule"] == "kl>+10%"
    assert {"pass": "gguf-export", "only_in": "B"} in data["passes_changed"]
    assert data["metrics"]["size"]["b"] < data["metrics"]["size"]["a"]


@pytest.mark.parametrize("rules, fragment", [("ppl>>5", "cannot read 'ppl>>5'"),
                                             ("speed>+1%", "unknown metric 'speed'"),
                                             ("tpot_p99>+5%", "--bench-a and --bench-b")])
def test_bad_rules_are_refused(bundle, rules, fragment):
    result = dwc("diff", bundle, bundle, "--fail-on", rules)
    assert_clean_error(result, 2, fragment)


def test_rule_parsing():
    rule, = parse_rules("top1<-0.01")
    assert (rule.metric, rule.above, rule.limit, rule.relative) == ("top1", False, 0.01, False)
    assert str(parse_rules(" ppl > +0.5 % ")[0]) == "ppl>+0.5%"
