"""A Hugging Face Llama / Mistral / Qwen2 model as an F16 GGUF file, the way llama.cpp's
own converter (convert_hf_to_gguf.py) writes it, with gguf-py:

- architecture `llama` for Llama and Mistral, `qwen2` for Qwen2; hyperparameters under
  `<arch>.*`; tensors under llama.cpp's names (gguf.TENSOR_NAMES);
- the Q and K rows of `llama` models permuted from Hugging Face's rotate-half layout to
  the interleaved pairs llama.cpp's rope expects (not for `qwen2`, which llama.cpp
  runs in the NeoX layout, as Hugging Face stores it);
- 2-D weights in F16, 1-D tensors (norms, biases) in F32; tied embeddings without
  `output.weight`; Llama-3 rope scaling as the `rope_freqs` tensor, linear scaling as
  keys;
- the tokenizer embedded: byte-level BPE (tokenizer.json) with its merges, special and
  added tokens typed, BOS / EOS / padding ids, whether a BOS is added, and the chat
  template. llama.cpp picks its pre-tokenizer (the regex splitting text before BPE) by a
  name; `pretokenizer.choose_pre_tokenizer` tries the names llama.cpp knows and keeps the first whose
  tokenization of real text matches the Hugging Face tokenizer's exactly.

What llama.cpp cannot represent (other architectures, SentencePiece or WordPiece
vocabularies, other rope scalings) is refused by `check_representable`, before any pass
runs. SentencePiece vocabularies are a known gap of this writer, not of llama.cpp.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dwc.errors import TargetError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
                 "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = (None, "default", "linear", "llama3")
F16_MAX = 65504.0


def rope_parameters(config: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs use
    `rope_theta` and `rope_scaling`."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def check_representable(path: Path, config: dict) -> None:
    """One line, naming what llama.cpp (or this writer) cannot take."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise TargetError(f"{path}: architecture {arch} has no GGUF mapping in dwc (supported: "
                          f"{', '.join(sorted(ARCHITECTURES))})")
    rope_type = rope_parameters(config).get("rope_type") or rope_parameters(config).get("type")
    if rope_type not in ROPE_TYPES:
        raise TargetError(f"{path}: rope scaling {rope_type!r} is not supported in GGUF bundles "
                          f"(supported: default, linear, llama3)")
    if ARCHITECTURES[arch] == "qwen2" and rope_type in ("linear", "llama3"):
        raise TargetError(f"{path}: rope scaling {rope_type!r} on Qwen2 is not supported in GGUF "
                          "bundles (llama.cpp's qwen2 takes no rope scaling tensor)")
    tok = Path(path) / "tokenizer.json"
    if not tok.is_file():
        raise TargetError(f"{path}: no tokenizer.json; GGUF bundles need a byte-level BPE "
                          "tokenizer (SentencePiece vocabularies are not supported yet)")
    model = json.loads(tok.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        raise TargetError(f"{tok}: a {model.get('type')} tokenizer; GGUF bundles need "
                          "byte-level BPE (SentencePiece vocabularies are not supported yet)")


def tensor_name(kind, block: int | None = None, suffix: str = "weight") -> str:
    import gguf

    return gguf.TENSOR_NAMES[kind].format(bid=block) + "." + suffix


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half Q/K rows -> llama.cpp's interleaved rope pairs (the
    permutation convert_hf_to_gguf.py applies for `llama`)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(params: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama-3 rope scaling (llama.cpp's `rope_freqs`)."""
    base = params["rope_theta"]
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_f16_gguf(model, source_dir: Path, out: Path, name: str, pre: str = "gpt-2") -> None:
    """The model's weights (any float dtype) and `source_dir`'s tokenizer as F16 GGUF."""
    import gguf

    cfg = model.config.to_dict()
    arch = ARCHITECTURES[cfg["architectures"][0]]
    w = gguf.GGUFWriter(str(out), arch)
    write_hyperparameters(w, cfg, name)
    write_tokenizer(w, Path(source_dir), cfg, pre)
    for tname, array in _tensors(model, cfg, arch):
        w.add_tensor(tname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hyperparameters(w, cfg: dict, name: str) -> None:
    import gguf

    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = rope_parameters(cfg)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if (rope.get("rope_type") or rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


def write_tokenizer(w, source_dir: Path, cfg: dict, pre: str) -> None:
    import gguf

    tok = json.loads((source_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
    size = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        if i < size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        if added["id"] < size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else \
                gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    special = _special_ids(source_dir, cfg, vocab, tok)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("pad", w.add_pad_token_id)):
        if special.get(key) is not None:
            add(special[key])
    w.add_add_bos_token(_adds_bos(source_dir))
    template = _chat_template(source_dir)
    if template:
        w.add_chat_template(template)


def _special_ids(source_dir: Path, cfg: dict, vocab: dict, tok: dict) -> dict:
    """BOS / EOS / padding ids: the model config's, else the tokenizer config's tokens."""
    ids = {k: cfg.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
    ids = {k: (v[0] if isinstance(v, list) else v) for k, v in ids.items()}
    tc_path = source_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    by_text = dict(vocab) | {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    for key in ids:
        value = tc.get(f"{key}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if ids[key] is None and value in by_text:
            ids[key] = by_text[value]
    return ids


def _adds_bos(source_dir: Path) -> bool:
    """Whether the Hugging Face tokenizer puts a BOS token in front of a text."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(source_dir, local_files_only=True)
    plain = t("a", add_special_tokens=False).input_ids
    full = t("a").input_ids
    return t.bos_token_id is not None and len(full) > len(plain) and full[0] == t.bos_token_id


def _chat_template(source_dir: Path) -> str | None:
    jinja = source_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc_path = source_dir / "tokenizer_config.json"
    if tc_path.is_file():
        template = json.loads(tc_path.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _tensors(model, cfg: dict, arch: str):
    """(GGUF name, numpy array) for every tensor, in llama.cpp's layout."""
    import gguf
    import torch

    T = gguf.MODEL_TENSOR
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}

    def weight(a: np.ndarray) -> np.ndarray:
        # F16 for matrices unless a value would overflow it (then F32, which llama.cpp
        # also reads); F32 for vectors, as llama.cpp's converter writes them.
        if a.ndim == 2 and np.abs(a).max() <= F16_MAX:
            return a.astype(np.float16)
        return a.astype(np.float32)

    yield tensor_name(T.TOKEN_EMBD), weight(state["model.embed_tokens.weight"])
    yield tensor_name(T.OUTPUT_NORM), weight(state["model.norm.weight"])
    if not cfg.get("tie_word_embeddings"):
        yield tensor_name(T.OUTPUT), weight(state["lm_head.weight"])
    rope = rope_parameters(cfg)
    if (rope.get("rope_type") or rope.get("type")) == "llama3":
        yield tensor_name(T.ROPE_FREQS), llama3_rope_factors(rope, head_dim)
    names = {"self_attn.q_proj": T.ATTN_Q, "self_attn.k_proj": T.ATTN_K,
             "self_attn.v_proj": T.ATTN_V, "self_attn.o_proj": T.ATTN_OUT,
             "mlp.gate_proj": T.FFN_GATE, "mlp.up_proj": T.FFN_UP, "mlp.down_proj": T.FFN_DOWN,
             "input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM}
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, kind in names.items():
            for suffix in ("weight", "bias"):
                a = state.get(f"model.layers.{i}.{hf_name}.{suffix}")
                if a is None:
                    continue
                if arch == "llama" and hf_name in ("self_attn.q_proj", "self_attn.k_proj"):
                    a = permute_rows(a, heads if hf_name == "self_attn.q_proj" else kv_heads)
                yield tensor_name(kind, i, suffix), weight(a)
