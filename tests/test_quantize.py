"""Calibrated quantization on the trained example model: FP8, INT8 SmoothQuant, INT4
AWQ / GPTQ / RTN; the compressed-tensors bundle; the measured back-off; exit 3."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dwc.quality.data import token_windows
from dwc.quality.metrics import compare, hf_logits
from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile


def quality(bundle):
    return manifest_of(bundle)["quality"]


def tensors(bundle) -> dict:
    with safe_open(bundle / "model" / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_fp8_layout_and_quality(build_for):
    b = build_for("h100-fp8")
    q, m = quality(b), manifest_of(b)
    assert q["passed"] and q["delta_pct"] <= 1.0
    assert m["quantization"]["scheme"] == "fp8-w8a8" and m["quantization"]["format"] == "compressed-tensors"
    cfg = json.loads((b / "model" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["ignore"] == ["lm_head"]
    t = tensors(b)
    w = "model.layers.0.self_attn.q_proj"
    assert t[f"{w}.weight"].dtype == torch.float8_e4m3fn
    assert t[f"{w}.weight_scale"].shape == (256, 1)        # one scale per output channel
    assert t[f"{w}.input_scale"].numel() == 1              # static, per tensor
    assert t["lm_head.weight"].dtype == torch.bfloat16
    assert (b / "reports" / "layer_error.png").exists()
    errors = json.loads((b / "reports" / "layer_error.json").read_text())["layers"]
    assert len(errors) == 28 and all(0 < e < 0.05 for e in errors.values())


def test_int8_smoothquant(build_for):
    b = build_for("a100-int8-sq")
    q, m = quality(b), manifest_of(b)
    assert q["passed"] and q["delta_pct"] <= 2.0
    assert m["quantization"]["smoothing_strength"] == 0.8
    t = tensors(b)
    assert t["model.layers.1.mlp.down_proj.weight"].dtype == torch.int8


def test_awq_and_gptq_beat_round_to_nearest(build_for):
    awq = quality(build_for("h100-int4-awq"))
    gptq = quality(build_for("h100-int4-awq", "quantize.method=gptq"))
    rtn = quality(build_for("h100-int4-awq", "quantize.method=rtn"))
    assert awq["passed"] and awq["delta_pct"] <= 5.0 and gptq["delta_pct"] <= 5.0
    # KL to the original is the discriminating measure on this small model (its perplexity
    # moves by hundredths of a percent either way under INT4 noise).
    assert awq["kl_divergence"] < rtn["kl_divergence"]
    assert gptq["kl_divergence"] < rtn["kl_divergence"]
    # Top-1 agreement is a count over the evaluation tokens: two methods a few tokens
    # apart are a tie. Three standard errors of the paired difference (its discordant
    # tokens are at most both methods' disagreements) is the noise bound; a broken AWQ
    # falls far below it.
    n = awq["tokens"]
    noise = 3 * ((2 - awq["top1_agreement"] - rtn["top1_agreement"]) / n) ** 0.5
    assert awq["top1_agreement"] >= rtn["top1_agreement"] - noise, (awq, rtn, noise)


def test_bundle_loads_in_plain_transformers_with_the_manifest_perplexity(build_for, example):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for bundle in (build_for("h100-int4-awq"), build_for("h100-fp8")):
        q = quality(bundle)
        tok = AutoTokenizer.from_pretrained(bundle / "model")
        windows = token_windows(example / "eval.txt", tok, 16, 256)
        model = AutoModelForCausalLM.from_pretrained(bundle / "model")
        ref = AutoModelForCausalLM.from_pretrained(example / "checkpoint")
        r = compare(hf_logits(ref), hf_logits(model), windows, 4).result()
        # The manifest measured through dwc's runtime; transformers orders the bf16
        # attention and norm arithmetic differently, so the two agree to ~1e-4.
        assert abs(r["optimized"] - q["optimized"]) / q["optimized"] < 1e-3, (r, q)


def test_backoff_keeps_the_worst_layers_in_bf16(build_for):
    rtn = quality(build_for("h100-int4-awq", "quantize.method=rtn"))
    budget = rtn["kl_divergence"] * 0.97
    b = build_for("h100-int4-awq", "quantize.method=rtn", f"evaluation.max_kl_divergence={budget}")
    q, quant = quality(b), manifest_of(b)["quantization"]
    assert q["passed"] and q["kl_divergence"] <= budget
    assert 1 <= len(quant["fallback_layers"]) <= 8
    assert set(quant["fallback_layers"]) <= set(quant["excluded"])
    errors = json.loads((build_for("h100-int4-awq", "quantize.method=rtn") / "reports" /
                         "layer_error.json").read_text())["layers"]
    assert quant["fallback_layers"][0] == max(errors, key=errors.get)  # worst layer first
    t = tensors(b)
    kept = quant["fallback_layers"][0]
    assert t[f"{kept}.weight"].dtype == torch.bfloat16
    assert f"{kept}.weight_packed" not in t


def test_budget_that_cannot_be_met_exits_3_without_a_bundle(example, tmp_path):
    bf = write_buildfile(tmp_path, example)
    out = tmp_path / "bundle"
    result = dwc("build", bf, "-t", "h100-int4-awq", "-o", out, "--set", "quantize.method=rtn",
                 "--set", "quantize.max_backoff_layers=1",
                 "--set", "evaluation.max_kl_divergence=1e-7")
    assert_clean_error(result, 3, "[evaluate]", "quality budget exceeded",
                       "int4-w4a16 (rtn), 1 layers kept in bf16", "KL divergence", "budget 1e-07")
    assert not out.exists()


def test_a_quantized_target_needs_a_gpu_runtime_and_aligned_sizes(example):
    from dwc.model.checkpoint import model_info
    from dwc.errors import TargetError
    from dwc.compiler.target import load_target

    target = load_target("h100-fp8")
    target.device = "cpu"
    with pytest.raises(TargetError, match="needs a GPU runtime"):
        target.check_model(model_info(example / "checkpoint"))
    awq = load_target("h100-int4-awq")
    info = model_info(example / "checkpoint")
    object.__setattr__(info, "intermediate_size", 700)
    with pytest.raises(TargetError, match="intermediate_size 700 is not a multiple of 128"):
        awq.check_model(info)
