"""Loading checkpoints: families, sharding, tied embeddings, and refusing bad files."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from dwc.model.checkpoint import model_info, safetensors_header, weight_files
from dwc.errors import CheckpointError
from dwc.model.loading import load_model, load_tokenizer
from dwc.compiler.target import load_target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_checkpoint(folder, example, model_type: str, tie: bool = False, shard: str | None = None):
    """A random tiny model of one family, saved with the example's tokenizer."""
    import transformers

    config_cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
    cfg = getattr(transformers, config_cls[model_type])(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    for name in TOKENIZER_FILES:
        if (example / "checkpoint" / name).exists():
            shutil.copy(example / "checkpoint" / name, folder / name)
    return model


@pytest.mark.parametrize("model_type, tie", [("llama", False), ("mistral", False),
                                              ("qwen2", True)])
def test_families_load_with_their_weights(example, tmp_path, model_type, tie):
    original = tiny_checkpoint(tmp_path, example, model_type, tie=tie)
    info = model_info(tmp_path)
    assert info.model_type == model_type and info.tie_word_embeddings == tie
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (4, 2, 16)
    loaded = load_model(info, "float32")
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    if model_type == "qwen2":  # q/k/v biases are part of the family
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    load_target("cpu-bf16").check_model(info)


def test_sharded_checkpoint_loads_every_shard(example, tmp_path):
    original = tiny_checkpoint(tmp_path, example, "llama", shard="300KB")
    files = weight_files(tmp_path)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_model(model_info(tmp_path), "float32")
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(),
                                                 loaded.state_dict().values()))
    files[-1].unlink()
    with pytest.raises(CheckpointError, match="names shard .* which is missing"):
        weight_files(tmp_path)


def test_example_tokenizer_loads(example):
    tok = load_tokenizer(example / "checkpoint")
    assert tok.decode(tok("def main():\n    pass\n")["input_ids"]) == "def main():\n    pass\n"


def _first_tensor_file(folder):
    return weight_files(folder)[0]


def test_corrupt_and_truncated_safetensors(example, tmp_path):
    tiny_checkpoint(tmp_path, example, "llama")
    path = _first_tensor_file(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 10**15) + good[8:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        safetensors_header(path)
    n = struct.unpack("<Q", good[:8])[0]
    path.write_bytes(good[:8] + b"{" * n + good[8 + n:])
    with pytest.raises(CheckpointError, match="not JSON"):
        safetensors_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="shorter than its header"):
        safetensors_header(path)


def test_shape_mismatch_with_config_is_refused(example, tmp_path):
    tiny_checkpoint(tmp_path, example, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        load_model(model_info(tmp_path), "float32")


def test_nan_weights_are_refused(example, tmp_path):
    model = tiny_checkpoint(tmp_path, example, "llama")
    model.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="down_proj.weight holds NaN"):
        load_model(model_info(tmp_path), "float32")


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     "unsupported architecture model_type='gpt2'"),
    (lambda c: c.update(architectures=["LlamaForSequenceClassification"]), "unsupported architectures"),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (lambda c: c.update(hidden_size="big"), "hidden_size must be a positive integer"),
])
def test_config_problems_name_the_field(example, tmp_path, edit, fragment):
    tiny_checkpoint(tmp_path, example, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=fragment):
        model_info(tmp_path)


def test_missing_config_pickle_only_and_no_tokenizer(example, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        model_info(tmp_path)
    tiny_checkpoint(tmp_path, example, "llama")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights found"):
        weight_files(tmp_path)
    for name in TOKENIZER_FILES:
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_odd_head_size_is_refused_by_the_target(example, tmp_path):
    tiny_checkpoint(tmp_path, example, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(hidden_size=60, num_attention_heads=4, head_dim=15)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from dwc.errors import TargetError

    with pytest.raises(TargetError, match="head size 15 is odd"):
        load_target("cpu-bf16").check_model(model_info(tmp_path))
