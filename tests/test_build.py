"""End to end: dwc build -> bundle -> dwc inspect, on the trained example model."""

from __future__ import annotations

import json
import shutil

import torch

from dwc.formats import manifest as mf
from dwc.bundle.hashing import sha256_file
from tests.conftest import dwc, manifest_of, write_buildfile


def test_manifest_has_every_field(bundle):
    m = manifest_of(bundle)
    assert list(m) == list(mf.KEYS)
    assert m["schema"] == mf.SCHEMA and m["name"] == "stdlib-coder"
    assert set(m["target"]) >= set(mf.TARGET_KEYS) and m["target"]["name"] == "cpu-bf16"
    assert [p["name"] for p in m["passes"]] == ["load", "calibrate", "fuse", "kv-layout", "evaluate",
                                                "emit"]
    assert all(set(p) == set(mf.PASS_KEYS) for p in m["passes"])
    assert set(m["quality"]) >= set(mf.QUALITY_KEYS)
    assert m["source"]["architecture"] == "LlamaForCausalLM"
    assert len(m["source"]["model"]["files"]["model.safetensors"]) == 64
    assert m["quantization"]["weight_dtype"] == "bfloat16" and m["draft"] is None


def test_every_file_is_listed_with_its_hash(bundle):
    m = manifest_of(bundle)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(m["files"])
    for rel, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(bundle / rel, memo=False)
        assert entry["bytes"] == (bundle / rel).stat().st_size
    for needed in ("README.md", "model/config.json", "model/model.safetensors",
                   "model/tokenizer.json", "reports/quality.json", "reports/quality.png",
                   "reports/calibration.json", "reports/kv_plan.json"):
        assert needed in m["files"]


def test_quality_is_measured_not_assumed(bundle, example):
    """Recompute the perplexities from the bundle's model and the source checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dwc.quality.data import token_windows

    q = manifest_of(bundle)["quality"]
    tok = AutoTokenizer.from_pretrained(bundle / "model")
    windows = token_windows(example / "eval.txt", tok, 8, 256)
    ids = torch.stack(windows)
    opt = AutoModelForCausalLM.from_pretrained(bundle / "model")
    ref = AutoModelForCausalLM.from_pretrained(example / "checkpoint")
    assert next(opt.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ppl_opt = torch.exp(opt(ids, labels=ids).loss.float()).item()
        ppl_ref = torch.exp(ref(ids, labels=ids).loss).item()
    assert abs(ppl_ref - q["baseline"]) / q["baseline"] < 1e-4
    assert abs(ppl_opt - q["optimized"]) / q["optimized"] < 2e-3
    assert q["baseline"] < 400  # the example model learned: far below its 4096-token vocabulary
    assert 0.9 < q["top1_agreement"] <= 1.0 and q["kl_divergence"] >= 0
    assert q["passed"] and q["budget_pct"] == 1.0


def test_inspect_shows_a_summary(bundle):
    result = dwc("inspect", bundle)
    assert result.exit_code == 0, result.stderr
    for text in ("stdlib-coder", "cpu-bf16", "perplexity", "calibrate", "evaluate", "model"):
        assert text in result.stdout
    as_json = dwc("inspect", bundle, "--json")
    assert json.loads(as_json.stdout) == manifest_of(bundle)


def test_verify_passes_then_names_a_tampered_file(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    ok = dwc("inspect", "--verify", copy)
    assert ok.exit_code == 0 and "verified" in ok.stdout
    weights = copy / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only a re-hash catches it
    weights.write_bytes(bytes(data))
    assert dwc("inspect", copy).exit_code == 0  # sizes still match; plain inspect is cheap
    bad = dwc("inspect", "--verify", copy)
    assert bad.exit_code == 2
    assert "model/model.safetensors: sha256 differs" in bad.stderr
    as_json = json.loads(dwc("inspect", "--verify", "--json", copy).stdout)
    assert as_json["verified"] is False and as_json["error"]["code"] == 2
    (copy / "reports" / "quality.json").write_text("{}")
    refused = dwc("inspect", copy)
    assert refused.exit_code == 2 and "reports/quality.json: size" in refused.stderr


def test_rebuild_reuses_cached_passes(example, bundle, tmp_path):
    build_file = write_buildfile(tmp_path, example)
    out = tmp_path / "again"
    assert dwc("build", build_file, "-t", "cpu-bf16", "-o", out).exit_code == 0
    cached = {p["name"]: p["cached"] for p in manifest_of(out)["passes"]}
    assert cached == {"load": False, "calibrate": True, "fuse": False, "kv-layout": False,
                      "evaluate": True, "emit": False}
    assert manifest_of(out)["files"] == manifest_of(bundle)["files"]


def test_builds_are_reproducible_without_the_cache(example, bundle, tmp_path):
    build_file = write_buildfile(tmp_path, example)
    out = tmp_path / "fresh"
    result = dwc("build", build_file, "-t", "cpu-bf16", "-o", out, "--no-cache", "--json")
    assert result.exit_code == 0, result.stderr
    a, b = manifest_of(bundle), manifest_of(out)
    assert a["files"] == b["files"]  # every file byte-identical
    assert not any(p["cached"] for p in b["passes"])
    for m in (a, b):  # only the documented volatile fields differ
        m.pop("build")
        for p in m["passes"]:
            for key in mf.VOLATILE_PASS_KEYS:
                p.pop(key)
    a["source"]["build_file"] = b["source"]["build_file"]  # written to a different folder
    assert a == b
    assert json.loads(result.stdout)["manifest"]["name"] == "stdlib-coder"
