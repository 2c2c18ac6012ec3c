"""The KV plan: its arithmetic, its refusals, the SLO's step budget, and the runtime using it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dwc.compiler.artifacts import Artifacts
from dwc.model.checkpoint import ModelInfo
from dwc.errors import TargetError
from dwc.passes.kv_layout import KvLayoutOptions, plan_kv
from dwc.compiler.target import load_target
from tests.conftest import manifest_of

LLAMA3_8B = ModelInfo(path=None, model_type="llama", architecture="LlamaForCausalLM",
                      hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                      config={"max_position_embeddings": 8192})


class FakeModel(torch.nn.Module):
    def __init__(self, params: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(0))
        self.n = params

    def parameters(self):
        return [SimpleNamespace(numel=lambda: self.n)]


def ctx_for(target: str, slo=None, weight_bytes=8_030_000_000):
    quantized = SimpleNamespace(summary={"weight_bytes": weight_bytes})
    return SimpleNamespace(target=load_target(target), info=LLAMA3_8B,
                           build=SimpleNamespace(slo=slo),
                           artifacts=Artifacts(quantized=quantized, model=FakeModel(8_030_000_000)))


def test_llama3_8b_on_h200_fp8():
    plan = plan_kv(ctx_for("h200-fp8"), KvLayoutOptions())
    a = plan["arithmetic"]
    assert plan["dtype"] == "fp8_e4m3" and plan["bytes_per_token"] == 32 * 2 * 8 * 128 * 1
    assert plan["max_context"] == 8192 and plan["max_num_batched_tokens"] == 8192
    expected_free = 141e9 * 0.9 - 8.03e9 - 2e9 - a["step_activation_bytes"]
    assert a["kv_bytes_available"] == int(expected_free)
    assert plan["num_blocks"] == a["blocks_that_fit"] == int(expected_free // (65536 * 16))
    assert plan["num_blocks"] * 16 * 65536 <= expected_free
    assert plan["max_num_seqs"] == 512  # the cap: 856 sequences of 8k context would fit


def test_too_little_memory_is_refused():
    slo = SimpleNamespace(max_context=8192, target_latency_ms=None)
    with pytest.raises(TargetError, match="leave .* GB for the KV cache"):
        plan_kv(ctx_for("h100-fp8", slo, weight_bytes=75_000_000_000), KvLayoutOptions())


def test_latency_slo_sets_the_step_token_budget():
    slo = SimpleNamespace(max_context=4096, target_latency_ms=20)
    plan = plan_kv(ctx_for("h200-fp8", slo), KvLayoutOptions())
    # 20 ms - 8.03 GB / 4161 GB/s leaves 18.07 ms; at 1979 TFLOP/s and 2 x 8.03 GFLOP per
    # token that is 2,226 tokens, rounded down to whole blocks.
    spare = 0.020 - 8.03e9 / 4161e9
    assert plan["max_num_batched_tokens"] == int(spare * 1979e12 / (2 * 8.03e9)) // 16 * 16
    assert plan["max_context"] == 4096


def test_bundle_plan_and_the_runtime_sizing_itself_from_it(bundle):
    from dwc.runtime.engine import Engine

    plan = manifest_of(bundle)["kv_cache"]
    assert plan["dtype"] == "bfloat16" and plan["block_size"] == 16
    assert plan["max_context"] == 1024 and plan["bytes_per_token"] == 4 * 2 * 2 * 64 * 2
    assert plan["num_blocks"] * 16 * plan["bytes_per_token"] <= plan["arithmetic"]["kv_bytes_available"]
    assert (bundle / "reports" / "kv_plan.json").exists()
    if torch.cuda.is_available():  # the plan fits the device
        eng = Engine.from_bundle(bundle)
    else:
        with pytest.warns(UserWarning, match="blocks; 4096 fit on this cpu"):
            eng = Engine.from_bundle(bundle)
    assert eng.scheduler.max_num_seqs == plan["max_num_seqs"]
    assert eng.scheduler.max_num_batched_tokens == plan["max_num_batched_tokens"]
    assert eng.blocks.block_size == 16 and len(eng.blocks.blocks) <= plan["num_blocks"]


def test_on_a_smaller_gpu_the_runtime_keeps_the_plans_step_memory(bundle, monkeypatch):
    """A plan made for more memory than the GPU has: the blocks that fit leave room for
    the weights, the workspace and the step's activations and graph buffers as the plan
    counts them, and are the most that do (an H200 plan on an 80 GB H100 ran out of
    memory when the fit counted the weights alone)."""
    from dwc.model.checkpoint import model_info
    from dwc.model.kvcache import GPU_WORKSPACE_BYTES, kv_bytes_per_token, step_activation_bytes
    from dwc.runtime.config import EngineConfig
    from dwc.runtime.memory import fit_blocks

    model = bundle / "model"
    free = 5e9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free), int(free)))
    c = EngineConfig(num_blocks=10 ** 7, max_num_seqs=512, max_num_batched_tokens=8192)
    with pytest.warns(UserWarning, match="fit on this cuda"):
        blocks = fit_blocks(model, None, c, "cuda", torch.bfloat16)
    info = model_info(model)
    per_block = kv_bytes_per_token(info, 2) * 16
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    step = step_activation_bytes(info, 2, 1, True, 512, 8192)
    assert step > 0.1e9  # the graphs' logits and the step's activations are counted
    used = weights + GPU_WORKSPACE_BYTES + step + blocks * per_block
    assert used <= 0.9 * free < used + per_block
    # Speculative decoding: the graphs cover 1 + K rows a sequence (64 x 5 = 320 rows of
    # logits against 64), so fewer blocks fit.
    few = EngineConfig(num_blocks=10 ** 7, max_num_seqs=64, max_num_batched_tokens=8192)
    with pytest.warns(UserWarning):
        plain, spec = (fit_blocks(model, None, few, "cuda", torch.bfloat16, k) for k in (0, 4))
    extra = step_activation_bytes(info, 2, 1, True, 64, 8192, 320) - \
        step_activation_bytes(info, 2, 1, True, 64, 8192, 64)
    assert extra > 0 and plain - spec == pytest.approx(extra / per_block, abs=1)


def test_fp8_kv_plan_has_calibrated_scales_and_is_measured(build_for, example):
    """h100-fp8 plans an FP8 KV cache: per-layer scales from calibration, and evaluate
    measures the model with that cache (its KL exceeds the same model with a bf16 cache)."""
    import json

    from dwc.runtime.engine import Engine, EngineConfig
    from dwc.runtime.sequence import SamplingParams

    bundle = build_for("h100-fp8")
    m = manifest_of(bundle)
    plan = m["kv_cache"]
    assert plan["dtype"] == "fp8_e4m3" and len(plan["kv_scales"]) == 4
    assert all(0 < k < 1 and 0 < v < 1 for k, v in plan["kv_scales"])
    calib = json.loads((bundle / "reports" / "calibration.json").read_text())
    assert calib["tokens"] > 0
    eng = Engine.from_bundle(bundle, EngineConfig(kv_dtype="fp8_e4m3",
                                                  kv_scales=plan["kv_scales"]))
    assert eng.runner.cache[0].dtype == torch.float8_e4m3fn
    out = eng.generate(["def main():\n"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(out.output_ids) == 8
    # Recompute the gate's KL with the FP8 cache and with a bf16 cache.
    from transformers import AutoModelForCausalLM

    from dwc.quality.data import token_windows
    from dwc.quality.metrics import compare, hf_logits
    from dwc.runtime.model_runner import load_hf_model
    from dwc.runtime.scoring import runtime_logits

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the build measured
    model = load_hf_model(bundle / "model", device, torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(example / "checkpoint").to(device)
    windows = token_windows(example / "eval.txt", eng.tokenizer, 16, 256)
    weights = bundle / "model"
    fp8 = compare(hf_logits(ref), runtime_logits(model, device, weights, kv_dtype="fp8_e4m3",
                                                 kv_scales=plan["kv_scales"]), windows, 4).result()
    bf16 = compare(hf_logits(ref), runtime_logits(model, device, weights), windows, 4).result()
    assert abs(fp8["kl_divergence"] - m["quality"]["kl_divergence"]) < 1e-3 * fp8["kl_divergence"]
    assert fp8["kl_divergence"] > bf16["kl_divergence"]
    assert m["quality"]["passed"]
