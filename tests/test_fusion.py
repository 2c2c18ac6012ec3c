"""The `fuse` pass: its plan and kernel table in the bundle, and lossless fusion."""

from __future__ import annotations

import json

import pytest
import torch

from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.fusion import DEFAULT_PLAN, merge_raw
from dwc.runtime.sequence import SamplingParams
from tests.conftest import manifest_of
from tests.test_speculative import MORE_PROMPTS


def test_bundle_records_the_plan_and_kernel_table(bundle):
    fusion = manifest_of(bundle)["fusion"]
    assert fusion["plan"] == DEFAULT_PLAN
    ops = {row["op"]: row for row in fusion["kernels"]}
    assert ops["qkv_proj"]["fuses"] == ["q_proj", "k_proj", "v_proj"]
    assert ops["qkv_proj"]["shape"] == [256, 256 + 2 * 128]  # hidden 256, 2 KV heads of 64
    assert ops["gate_up_proj"]["shape"] == [256, 2 * 768]
    assert fusion["check"]["top1_agreement"] == 1.0 and fusion["check"]["max_logit_diff"] < 1e-5
    assert json.loads((bundle / "reports" / "kernels.json").read_text()) == fusion


def test_fused_runtime_is_token_identical_and_shares_weights(bundle):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    fused = Engine.from_bundle(bundle, EngineConfig(device="cpu"))
    assert "qkv" in fused.runner.decoder.proj[0] and "gate_up" in fused.runner.decoder.proj[0]
    plain = Engine(bundle / "model", EngineConfig(device="cpu"))  # no plan
    assert "q_proj" in plain.runner.decoder.proj[0]
    want = [o.output_ids for o in plain.generate(MORE_PROMPTS, params)]
    assert [o.output_ids for o in fused.generate(MORE_PROMPTS, params)] == want
    # The model's own q_proj is now a view of the stacked weight: no second copy.
    attn = fused.runner.hf_model.model.layers[0].self_attn
    stacked = fused.runner.decoder.proj[0]["qkv"].weight
    assert attn.q_proj.weight.data_ptr() == stacked.data_ptr()


def test_plan_options_turn_fusion_off(example, tmp_path):
    from tests.conftest import dwc, write_buildfile

    bf = write_buildfile(tmp_path, example)
    out = tmp_path / "b"
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", out, "--set", "fuse.qkv=false")
    assert result.exit_code == 0, result.stderr
    fusion = manifest_of(out)["fusion"]
    ops = [row["op"] for row in fusion["kernels"]]
    assert fusion["plan"]["qkv"] is False and "q_proj" in ops and "qkv_proj" not in ops
    eng = Engine.from_bundle(out, EngineConfig(device="cpu"))
    assert "q_proj" in eng.runner.decoder.proj[0] and "gate_up" in eng.runner.decoder.proj[0]


@pytest.mark.parametrize("target", ["h100-fp8", "h100-int4-awq"])
def test_quantized_tensors_stack_along_the_output(build_for, target):
    """merge_raw on the bundle's own compressed-tensors tensors: the stacked weights
    unpack to the parts' weights one after the other; scales and shapes follow."""
    from dwc.runtime.layers.linear import raw_tensors

    bundle = build_for(target)
    raw = raw_tensors(bundle / "model", "cpu")
    parts = [raw[f"model.layers.1.self_attn.{n}_proj"] for n in "qkv"]
    merged = merge_raw(parts)
    rows = [p["weight_scale"].shape[0] for p in parts]
    assert merged["weight_scale"].shape[0] == sum(rows)
    assert torch.equal(merged["weight_scale"], torch.cat([p["weight_scale"] for p in parts]))
    if "weight_packed" in merged:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        shape = torch.Size(merged["weight_shape"].tolist())
        assert shape == torch.Size([sum(rows), parts[0]["weight_shape"][1].item()])
        whole = unpack_from_int32(merged["weight_packed"], 4, shape)
        zp = unpack_from_int32(merged["weight_zero_point"], 4, merged["weight_scale"].shape,
                               packed_dim=0)
        start = 0
        for p, n in zip(parts, rows):
            own = unpack_from_int32(p["weight_packed"], 4, torch.Size(p["weight_shape"].tolist()))
            own_zp = unpack_from_int32(p["weight_zero_point"], 4, p["weight_scale"].shape,
                                       packed_dim=0)
            assert torch.equal(whole[start:start + n], own)
            assert torch.equal(zp[start:start + n], own_zp)
            start += n
    else:
        assert merged["weight"].dtype == torch.float8_e4m3fn
        scales = torch.stack([p["input_scale"].float().reshape(()) for p in parts])
        assert merged["input_scale"].float().item() == scales.max().item()


def test_cpu_keeps_quantized_modules_unstacked(build_for):
    """On the CPU a quantized bundle runs compressed-tensors' own modules: the plan
    stacks nothing there (stacking their stored weights would drop the quantization),
    and the pass's check sees identical logits."""
    bundle = build_for("h100-fp8")
    fusion = manifest_of(bundle)["fusion"]
    assert fusion["check"]["max_logit_diff"] == 0.0
    eng = Engine.from_bundle(bundle, EngineConfig(device="cpu"))
    assert "q_proj" in eng.runner.decoder.proj[0] and "qkv" not in eng.runner.decoder.proj[0]
