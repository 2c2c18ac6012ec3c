"""LoRA merge: merged weights equal base + (alpha / r) * B @ A, and mismatches are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dwc.model.checkpoint import model_info
from dwc.errors import CheckpointError
from dwc.model.loading import load_model, merge_adapter
from tests.conftest import dwc, manifest_of, write_buildfile
from tests.test_checkpoint import tiny_checkpoint

TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_adapter(base_dir, out_dir, r=4, alpha=8, seed=0):
    """A PEFT LoRA adapter with non-zero A and B (peft starts B at zero)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(model_info(base_dir), "float32")
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter(example, tmp_path_factory):
    return make_adapter(example / "checkpoint", tmp_path_factory.mktemp("lora") / "adapter")


def test_merged_weights_equal_base_plus_scaled_ba(example, adapter):
    info = model_info(example / "checkpoint")
    base = load_model(info, "float32").state_dict()
    merged = merge_adapter(load_model(info, "float32"), adapter, "float32").state_dict()
    lora = load_file(adapter / "adapter_model.safetensors")
    scale = 8 / 4
    checked = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = lora[key.replace("lora_A", "lora_B")]
        expected = base[f"{module}.weight"].double() + scale * (b.double() @ a.double())
        got = merged[f"{module}.weight"].double()
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), module
        assert not torch.equal(got, base[f"{module}.weight"].double())
        checked += 1
    assert checked == 4 * len(TARGETS)  # every targeted Linear of the 4 layers
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], base[untouched])


def test_adapter_for_another_base_model_is_refused(example, tmp_path):
    other = tmp_path / "other"
    tiny_checkpoint(other, example, "llama")
    wrong = make_adapter(other, tmp_path / "wrong-adapter")
    info = model_info(example / "checkpoint")
    with pytest.raises(CheckpointError, match="adapter for another base model"):
        merge_adapter(load_model(info, "float32"), wrong, "float32")


def test_build_with_adapter_records_it(example, adapter, tmp_path):
    build_file = write_buildfile(tmp_path, example, adapter=str(adapter))
    out = tmp_path / "bundle"
    result = dwc("build", build_file, "-t", "cpu-bf16", "-o", out)
    assert result.exit_code == 0, result.stderr
    m = manifest_of(out)
    assert m["source"]["adapter"]["rank"] == 4 and m["source"]["adapter"]["alpha"] == 8
    assert set(m["source"]["adapter"]["files"]) == {"adapter_config.json",
                                                    "adapter_model.safetensors"}
    assert m["quality"]["passed"]
    # The bundle holds the merged model: plain transformers sees no adapter, merged weights.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    info = model_info(example / "checkpoint")
    merged = merge_adapter(load_model(info, "float32"), adapter, "float32")
    w = "model.layers.2.self_attn.q_proj.weight"
    assert torch.equal(loaded.state_dict()[w], merged.state_dict()[w].to(torch.bfloat16))
