"""`dwc bench` on the example bundle: figures present, consistent, and the baseline measured."""

from __future__ import annotations

import json

from tests.conftest import dwc


def test_bench_reports_throughput_latency_and_slo(bundle, tmp_path):
    result = dwc("bench", bundle, "--num-prompts", 4, "--input-len", 32, "--output-len", 8,
                 "--rps", 4, "--rps", 16, "--requests", 6, "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    off = r["offline"]
    assert off["output_tok_s"] > 0 and off["transformers_output_tok_s"] > 0
    assert abs(off["output_tok_s"] - 4 * 8 / off["seconds"]) < 0.01 * off["output_tok_s"]
    assert [lvl["rps"] for lvl in r["online_levels"]] == [4.0, 16.0]
    for lvl in r["online_levels"]:
        assert lvl["requests"] == 6 and lvl["achieved_rps"] > 0
        assert 0 < lvl["ttft_ms"]["p50"] <= lvl["ttft_ms"]["p99"]
        assert 0 < lvl["tpot_ms"]["p50"] <= lvl["tpot_ms"]["p99"]
    assert r["slo"] is None  # the example's build file sets no SLO
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert json.loads((tmp_path / "bench.json").read_text())["offline"] == off


def test_slo_comparison():
    from dwc.perf.bench import against_slo

    measured = {"online": {"tpot_ms": {"p99": 30.0}, "ttft_ms": {"p99": 900.0}}}
    checks = against_slo({"target_latency_ms": 25, "target_ttft_ms": 1000}, measured)
    assert checks == {"target_latency_ms": {"target": 25, "measured_p99": 30.0, "met": False},
                      "target_ttft_ms": {"target": 1000, "measured_p99": 900.0, "met": True}}


def test_bench_with_ngram_speculation(bundle):
    """`--ngram` measures the bundle with n-gram lookup in place of its draft; random-token
    prompts rarely repeat, so some steps verify drafts and most are plain ones."""
    result = dwc("bench", bundle, "--num-prompts", 2, "--input-len", 16, "--output-len", 24,
                 "--requests", 2, "--no-baseline", "--ngram", "--json")
    assert result.exit_code == 0, result.stderr
    spec = json.loads(result.stdout)["speculation"]
    assert spec["method"] == "ngram" and spec["k"] == 4
