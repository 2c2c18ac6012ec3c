"""`dwc build --target <hardware> | auto` (docs/SEARCH.md) on the CPU example: the a100
targets (built and measured on this CPU, costed by the roofline) and the cpu hardware
(cpu-bf16 measured; GGUF targets listed, not built)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile

SMALL = {"slo": {"target_latency_ms": 100, "prompt_tokens": 16, "output_tokens": 16},
         "passes": {"quantize": {"method": "rtn", "backoff": False}}}  # INT4 rtn loses more


def _search(folder, example, target, *sets, **changes):
    bf = write_buildfile(folder, example, **{**SMALL, **changes})
    out = folder / "bundle"
    args = [a for s in sets for a in ("--set", s)]
    return dwc("build", bf, "-t", target, "-o", out, *args), out


@pytest.fixture(scope="module")
def a100(example, tmp_path_factory):
    result, out = _search(tmp_path_factory.mktemp("search"), example, "a100")
    assert result.exit_code == 0, result.stderr
    return out


def rows(bundle) -> dict:
    return {r["target"]: r for r in manifest_of(bundle)["search"]["candidates"]}


def test_the_winner_is_the_cheapest_that_meets_budget_and_slo(a100):
    m = manifest_of(a100)
    s = m["search"]
    assert list(rows(a100)) == ["a100-int4-awq", "a100-int8-sq"]
    ok = [r for r in s["candidates"] if r["meets_quality"] and r["meets_slo"]]
    best = min(ok, key=lambda r: (r["usd_per_million_output_tokens"], r["delta_pct"]))
    assert s["winner"] == best["target"] == m["target"]["name"]
    for r in s["candidates"]:
        assert r["status"] == ("winner" if r is best else "lost")
        assert (r["why"] is None) == (r is best)
        assert r["usd_per_million_output_tokens"] and r["max_rps"] > 0 and r["tpot_p99_ms"]
    # the winner's own figures are the manifest's
    assert m["quality"]["delta_pct"] == best["delta_pct"]
    assert m["slo"]["predicted"]["max_rps"] == best["max_rps"]
    assert (a100 / "reports" / "search.png").read_bytes()[:4] == b"\x89PNG"
    assert "reports/search.png" in m["files"] and "reports/search.json" in m["files"]
    assert [p["name"] for p in m["passes"]].count("emit") == 1


def test_candidates_share_the_pass_cache(a100):
    """The second candidate restores calibrate (same key across the hardware's targets)."""
    assert "calibrate" in rows(a100)["a100-int8-sq"]["cached_passes"]


def test_a_tighter_quality_budget_moves_the_choice_to_the_wider_scheme(a100, example, tmp_path):
    """The budget is on KL to the original: on this small model INT4's perplexity change
    is noise of either sign (README, Measured), while its KL is ten times INT8's."""
    r = rows(a100)
    int4, int8 = r["a100-int4-awq"], r["a100-int8-sq"]
    assert manifest_of(a100)["search"]["winner"] == "a100-int4-awq"  # the cheaper one
    assert int8["kl_divergence"] < int4["kl_divergence"]
    budget = (int8["kl_divergence"] * int4["kl_divergence"]) ** 0.5
    result, out = _search(tmp_path, example, "a100",
                          f"evaluation.max_kl_divergence={budget:.6g}")
    assert result.exit_code == 0, result.stderr
    moved = rows(out)
    assert manifest_of(out)["search"]["winner"] == "a100-int8-sq"
    assert moved["a100-int4-awq"]["why"].startswith("quality:")
    assert manifest_of(out)["quantization"]["scheme"] == "int8-w8a8"


def test_no_candidate_in_the_budget_exits_3_naming_the_closest(a100, example, tmp_path):
    closest = min(rows(a100).values(), key=lambda r: r["delta_pct"])
    result, out = _search(tmp_path, example, "a100", "evaluation.max_kl_divergence=1e-9")
    assert_clean_error(result, 3, "no candidate meets the quality budget",
                       f"the closest, {closest['target']}")
    assert not out.exists() and not list(tmp_path.glob(".bundle.*"))


def test_max_minutes_stops_starting_candidates(example, tmp_path):
    result, out = _search(tmp_path, example, "a100", "search.max_minutes=0.00001")
    assert result.exit_code == 0, result.stderr
    r = rows(out)
    assert r["a100-int4-awq"]["status"] == "winner"
    assert r["a100-int8-sq"]["status"] == "not run"
    assert "search.max_minutes" in r["a100-int8-sq"]["why"]
    assert "search.max_minutes (1e-05) was reached" in " ".join(result.stderr.split())


@pytest.fixture(scope="module")
def cpu(example, tmp_path_factory):
    slo = dict(SMALL["slo"], target_latency_ms=100, target_rps=1000)
    result, out = _search(tmp_path_factory.mktemp("cpu"), example, "auto", slo=slo)
    assert result.exit_code == 0, result.stderr
    return out


def test_auto_on_this_machine_searches_the_cpu_targets(cpu):
    r = rows(cpu)
    assert manifest_of(cpu)["search"]["winner"] == "cpu-bf16"
    assert {n for n, row in r.items() if row["status"] == "skipped"} == \
        {"cpu-gguf-f16", "cpu-gguf-q4_k_m", "cpu-gguf-q8_0"}
    assert "tune" in [p["name"] for p in manifest_of(cpu)["passes"]]  # added to cost it


def test_a_tighter_latency_needs_more_replicas(cpu, example, tmp_path):
    loose = rows(cpu)["cpu-bf16"]
    assert loose["replicas"] >= 2  # 1000 rps is more than one CPU serves
    slo = dict(SMALL["slo"], target_latency_ms=loose["tpot_p99_ms"] / 2, target_rps=1000)
    result, out = _search(tmp_path, example, "cpu", slo=slo)
    assert result.exit_code == 0, result.stderr
    tight = rows(out)["cpu-bf16"]
    assert tight["tpot_p99_ms"] <= slo["target_latency_ms"]
    assert tight["max_rps"] < loose["max_rps"] and tight["replicas"] > loose["replicas"]


def test_an_slo_no_candidate_meets_exits_4_naming_the_closest(example, tmp_path):
    slo = dict(SMALL["slo"], target_latency_ms=0.001)
    result, out = _search(tmp_path, example, "cpu", slo=slo)
    assert_clean_error(result, 4, "no candidate meets the SLO", "the closest, cpu-bf16",
                       "TPOT")
    assert not out.exists()


@pytest.mark.parametrize("target, sets, fragment", [
    ("h999", (), "unknown target 'h999'"),
    ("cpu", ("search.max_minutes=0",), "search.max_minutes: must be > 0"),
    ("cpu", ("search.targets=[h100-fp8]",), "search.targets: 'h100-fp8' is not a target of cpu"),
])
def test_bad_values_are_one_line_errors(example, tmp_path, target, sets, fragment):
    result, out = _search(tmp_path, example, target, *sets)
    assert_clean_error(result, 2, fragment)
    assert not out.exists()


def test_diff_shows_two_search_tables_side_by_side(a100, cpu):
    result = json.loads(dwc("diff", a100, cpu, "--json").stdout)
    targets = [r["target"] for r in result["search"]]
    assert targets[:2] == ["a100-int4-awq", "a100-int8-sq"] and "cpu-bf16" in targets
    row = result["search"][0]
    assert row["a"]["status"] == "winner" and row["b"] is None
    text = dwc("diff", a100, cpu).stdout
    assert "search" in text and "a100-int8-sq" in text
    shown = dwc("inspect", a100).stdout
    assert "search: winner a100-int4-awq" in shown


def test_a_plain_build_has_no_search(bundle):
    assert manifest_of(bundle)["search"] is None
