"""TensorRT-LLM bundles: ModelOpt's unified Hugging Face checkpoint held to the format's
rules (TensorRT-LLM itself cannot run here), its quality reproduced by dwc's PyTorch
reader, and the serving files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from dwc.backends.tensorrt_llm import checkpoint as modelopt_hf
from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tensors_of(folder: Path) -> dict:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def original(example) -> dict:
    return tensors_of(example / "checkpoint")


@pytest.mark.parametrize("target", ["h100-trtllm-fp8", "h100-trtllm-int4-awq"])
def test_every_quantized_linear_has_the_layout(build_for, example, target):
    bundle = build_for(target)
    t = tensors_of(bundle / "model")
    layers = json.loads((example / "checkpoint" / "config.json").read_text())["num_hidden_layers"]
    fp8 = target.endswith("fp8")
    for i in range(layers):
        for name in LINEARS:
            p = f"model.layers.{i}.{name}"
            assert t[f"{p}.weight"].dtype == (torch.float8_e4m3fn if fp8 else torch.uint8), p
            scale = t[f"{p}.weight_scale"]
            assert scale.dtype == torch.float32 and (scale > 0).all(), p
            if fp8:
                assert t[f"{p}.input_scale"].dtype == torch.float32 and t[f"{p}.input_scale"] > 0
            else:
                assert scale.shape == (t[f"{p}.weight"].shape[0] * 2, t[f"{p}.weight"].shape[1] // 128)
        if fp8:  # FP8 KV cache scales
            assert t[f"model.layers.{i}.self_attn.k_proj.k_scale"] > 0
            assert t[f"model.layers.{i}.self_attn.v_proj.v_scale"] > 0
    assert t["lm_head.weight"].dtype == torch.bfloat16  # excluded


def test_dequantized_weights_are_close_to_the_originals(build_for, example):
    """FP8: weight * scale. INT4 AWQ: q * group scale holds W / s for AWQ's pre-quant
    scale s (the input is multiplied by s), so W = dequantized * s; s is saved for o_proj /
    down_proj and folded into the norm before q/k/v and gate/up, where it is the ratio of
    the exported norm weight to the original."""
    orig = original(example)
    for target, bound in (("h100-trtllm-fp8", 0.05), ("h100-trtllm-int4-awq", 0.2)):
        t = tensors_of(build_for(target) / "model")
        quant = modelopt_hf.read_quant_config(build_for(target) / "model")
        for key, w in orig.items():
            module = key[:-len(".weight")]
            if f"{module}.weight_scale" not in t:
                continue
            got = modelopt_hf.dequantize(t, module, quant)
            pre = _pre_quant_scale(t, orig, module)
            if pre is not None:
                got = got * pre[None, :]
            err = ((got - w.float()).norm() / w.float().norm()).item()
            assert err < bound, (target, module, err)


def _pre_quant_scale(t: dict, orig: dict, module: str):
    if f"{module}.pre_quant_scale" in t:
        return t[f"{module}.pre_quant_scale"].float()
    layer, _, name = module.rpartition(".")
    norm = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
            "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}.get(name)
    if norm is None:
        return None
    base = layer.rpartition(".")[0]
    key = f"{base}.{norm}.weight"
    return t[key].float() / orig[key].float()


@pytest.mark.parametrize("target", ["h100-trtllm-fp8", "h100-trtllm-int4-awq"])
def test_quant_configs_agree_and_the_reader_reproduces_the_perplexity(build_for, target):
    bundle = build_for(target)
    m = manifest_of(bundle)
    hf_quant = json.loads((bundle / "model" / "hf_quant_config.json").read_text())
    config = json.loads((bundle / "model" / "config.json").read_text())
    q, qc = hf_quant["quantization"], config["quantization_config"]
    assert hf_quant["producer"]["name"] == "modelopt"
    assert q["quant_algo"] == qc["quant_algo"] == {"h100-trtllm-fp8": "FP8",
                                                   "h100-trtllm-int4-awq": "W4A16_AWQ"}[target]
    assert sorted(q["exclude_modules"]) == sorted(qc["ignore"]) and "lm_head" in qc["ignore"]
    assert (q.get("kv_cache_quant_algo") == "FP8") == ("kv_cache_scheme" in qc) == \
        target.endswith("fp8")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert m["quantization"]["quant_algo"] == q["quant_algo"] and m["quality"]["passed"]
    # the reader, from the bundle's own files, gives the manifest's perplexity
    model = modelopt_hf.load_model(bundle / "model", "cpu")
    assert abs(_perplexity(model, m) - m["quality"]["optimized"]) / m["quality"]["optimized"] < 1e-3


def _perplexity(model, manifest: dict) -> float:
    import math

    from transformers import AutoTokenizer

    from dwc.quality.data import token_windows

    ev = manifest["quality"]
    tok = AutoTokenizer.from_pretrained(manifest["source"]["model"]["path"])
    nll = n = 0.0
    with torch.no_grad():
        for w in token_windows(Path(ev["data"]), tok, ev["windows"], 256):
            logits = model(w[None]).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            n += len(w) - 1
    return math.exp(nll / n)


def test_the_options_file_follows_the_kv_plan(build_for):
    bundle = build_for("h100-trtllm-fp8")
    m = manifest_of(bundle)
    plan = m["kv_cache"]
    options = yaml.safe_load((bundle / "serve" / "llm_api_options.yaml").read_text())
    kv = options["kv_cache_config"]
    assert kv["dtype"] == "fp8" and kv["enable_block_reuse"] is True
    assert kv["tokens_per_block"] == plan["block_size"]
    assert options["max_batch_size"] == plan["max_num_seqs"]
    assert options["max_num_tokens"] == plan["max_num_batched_tokens"]
    assert options["max_seq_len"] == plan["max_context"]
    free = m["target"]["hardware"]["memory_gb"] * 1e9 - m["quantization"]["weight_bytes"]
    planned = plan["num_blocks"] * plan["block_size"] * plan["bytes_per_token"]
    assert kv["free_gpu_memory_fraction"] == pytest.approx(planned / free, abs=1e-4)
    assert options["cuda_graph_config"]["batch_sizes"][-1] == plan["max_num_seqs"]
    script = (bundle / "serve" / "trtllm-serve.sh").read_text()
    assert "trtllm-serve" in script and "llm_api_options.yaml" in script


def test_a_draft_becomes_draft_target_speculation(build_for):
    bundle = build_for("h100-trtllm-fp8", "draft=auto", "distill-draft.steps=20",
                       "distill-draft.candidates=[draft_model]")
    m = manifest_of(bundle)
    options = yaml.safe_load((bundle / "serve" / "llm_api_options.yaml").read_text())
    spec = options["speculative_config"]
    assert spec == {"decoding_type": "DraftTarget", "max_draft_len": m["draft"]["k"],
                    "speculative_model": "draft"}
    assert (bundle / "draft" / "config.json").is_file()
    assert "speculative_config" not in yaml.safe_load(
        (build_for("h100-trtllm-fp8") / "serve" / "llm_api_options.yaml").read_text())


def test_ngram_chosen_becomes_the_ngram_drafter(build_for):
    """The build's measured choice of n-gram lookup, as TensorRT-LLM's NGram drafter."""
    bundle = build_for("h100-trtllm-fp8", "draft=auto", "distill-draft.candidates=[ngram]")
    m = manifest_of(bundle)
    assert m["draft"]["method"] == "ngram"
    options = yaml.safe_load((bundle / "serve" / "llm_api_options.yaml").read_text())
    assert options["speculative_config"] == {
        "decoding_type": "NGram", "max_draft_len": m["draft"]["k"], "max_matching_ngram_size": 4,
        "is_use_oldest": False, "is_public_pool": False}
    assert not (bundle / "draft").exists()


def test_mistral_exports_too(example, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mistral", vocab_size=4096, hidden_size=128,
                               intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=512,
                               bos_token_id=0, eos_token_id=0, sliding_window=None)
    src = tmp_path / "mistral"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(example / "checkpoint" / name, src / name)
    bf = write_buildfile(tmp_path / "bf", example, model=str(src))
    result = dwc("build", bf, "-t", "h100-trtllm-fp8", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["quantization_config"]["quant_algo"] == "FP8"


def test_a_scheme_the_model_cannot_take_is_refused(example, tmp_path):
    """INT4 groups of 128 need intermediate_size to be a multiple of 128."""
    src = tmp_path / "odd"
    shutil.copytree(example / "checkpoint", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (src / "config.json").write_text(json.dumps(cfg))
    bf = write_buildfile(tmp_path / "bf", example, model=str(src))
    result = dwc("build", bf, "-t", "h100-trtllm-int4-awq", "-o", tmp_path / "out")
    assert_clean_error(result, 2, "intermediate_size 200", "128")
    assert "[1/" not in result.stdout
