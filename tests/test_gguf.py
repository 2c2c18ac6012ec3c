"""The GGUF backend, checked in llama.cpp itself (llama-cpp-python): tokenization, F16
logits against transformers for Llama and Qwen2 layouts (Q/K permutation, biases, tied
embeddings, Llama-3 rope scaling), the quality gate on Q8_0 / Q4_K_M bundles, the
imatrix, refusals, the serve files and `dwc bench`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile
from dwc.backends.gguf import llama as backend
from dwc.backends.gguf import file as gguf_file
from dwc.backends.gguf import pretokenizer


def llama_scores(path: Path, ids: list[int]) -> np.ndarray:
    llm = backend.open_model(path, len(ids), logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()


def f16_matches_transformers(model, source: Path, tmp: Path, ids: list[int]) -> None:
    path = tmp / "m.gguf"
    gguf_file.write_f16_gguf(model, source, path, "t", "gpt-2")
    got = llama_scores(path, ids)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    # F16 rounding of the weights alone: ~1e-3 of the logits' range on these models; a
    # wrong rope permutation or ignored rope factors give ~1e-2 (checked by mutation).
    assert np.abs(got - want).max() <= 3e-3 * np.abs(want).max(), np.abs(got - want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.97


@pytest.fixture(scope="module")
def eval_ids(example) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(example / "checkpoint")
    return tok((example / "eval.txt").read_text()[:4000], add_special_tokens=False).input_ids[:160]


def test_llama_cpp_tokenizes_the_evaluation_text_like_transformers(example, tmp_path):
    """The whole evaluation file (tens of thousands of tokens), under the pre-tokenizer
    the export picks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = example / "checkpoint"
    text = (example / "eval.txt").read_text()
    model = AutoModelForCausalLM.from_pretrained(src)
    pre = pretokenizer.choose_pre_tokenizer(model.config.to_dict(), src, text[:20000], tmp_path)
    assert pre == "gpt-2"
    gguf_file.write_f16_gguf(model, src, tmp_path / "m.gguf", "t", pre)
    want = AutoTokenizer.from_pretrained(src)(text, add_special_tokens=False).input_ids
    assert len(want) > 20000
    assert pretokenizer.llama_tokenize(tmp_path / "m.gguf", text) == want


def test_f16_logits_match_transformers_llama(example, tmp_path, eval_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(example / "checkpoint", dtype=torch.float32)
    f16_matches_transformers(model, example / "checkpoint", tmp_path, eval_ids)


def tiny(example, tmp: Path, kind: str, **config):
    """A small random model of `kind` with the example's tokenizer, saved to tmp/src."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(kind, vocab_size=4096, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
                               **config)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # untrained norms are all ones: perturb them so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    src = tmp / "src"
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(example / "checkpoint" / name, src / name)
    return model, src


def test_f16_logits_match_transformers_qwen2_with_biases_and_tied_embeddings(
        example, tmp_path, eval_ids):
    model, src = tiny(example, tmp_path, "qwen2", tie_word_embeddings=True)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    f16_matches_transformers(model, src, tmp_path, eval_ids)


def test_f16_logits_match_transformers_llama3_rope_scaling(example, tmp_path, eval_ids):
    scaling = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model, src = tiny(example, tmp_path, "llama", rope_parameters=scaling)
    factors = gguf_file.llama3_rope_factors(scaling, 32)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the rule are used
    # llama.cpp divides the base frequencies by the factors: that must be transformers' own
    base = 1.0 / (10000.0 ** (np.arange(0, 32, 2) / 32))
    np.testing.assert_allclose(base / factors, model.model.rotary_emb.inv_freq.numpy(),
                               rtol=1e-5)
    f16_matches_transformers(model, src, tmp_path, eval_ids)


@pytest.mark.parametrize("target, budget", [("cpu-gguf-q8_0", 1.0), ("cpu-gguf-q4_k_m", 5.0)])
def test_quantized_bundles_meet_their_budget_measured_in_llama_cpp(build_for, target, budget):
    bundle = build_for(target)
    m = manifest_of(bundle)
    q = m["quality"]
    assert q["passed"] and q["delta_pct"] <= budget, q
    assert q["top1_agreement"] > 0.8
    quant = m["quantization"]
    k_quant = target == "cpu-gguf-q4_k_m"  # Q8_0 ignores an imatrix: none is passed
    assert quant["format"] == "gguf" and quant["imatrix"] is k_quant
    assert quant["imatrix_tensors"] == (28 if k_quant else 0)
    expected = {"cpu-gguf-q8_0": "Q8_0", "cpu-gguf-q4_k_m": "Q4_K"}[target]
    assert expected in quant["tensor_types"]
    files = set(m["files"])
    assert {"model/model.gguf", "serve/llama-server.sh", "serve/Modelfile"} <= files
    assert "model/model.gguf" in (bundle / "serve" / "llama-server.sh").read_text()
    assert "FROM ../model/model.gguf" in (bundle / "serve" / "Modelfile").read_text()
    # the gate measured the file the bundle ships: the same perplexity from it here
    ppl = _perplexity(bundle / "model" / "model.gguf", m)
    assert abs(ppl - q["optimized"]) / q["optimized"] < 1e-3, (ppl, q["optimized"])


def _perplexity(path: Path, manifest: dict) -> float:
    from transformers import AutoTokenizer

    from dwc.quality.data import token_windows

    ev = manifest["quality"]
    tok = AutoTokenizer.from_pretrained(manifest["source"]["model"]["path"])
    windows = token_windows(Path(ev["data"]), tok, ev["windows"], 256)
    fn = backend.llama_logits(path, 256)
    nll = n = 0.0
    for w in windows:
        logits = fn(w[None])[0].double()
        nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        n += len(w) - 1
    fn.close()
    return float(np.exp(nll / n))


def imatrix_weighted_errors(example, bundles: dict, tmp: Path) -> dict[str, float]:
    """Per bundle: the sum over K-quant tensors of sum_j imatrix_j * (w_ij - q_ij)^2, the
    error llama.cpp's quantizer lowers when it is given the imatrix, against the F16 file
    the export quantizes from and the calibration statistics the build used."""
    import types

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dwc.compiler.ui import Reporter
    from dwc.passes.calibrate import collect
    from dwc.quality.data import token_windows

    src = example / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    windows = token_windows(example / "calib.txt", AutoTokenizer.from_pretrained(src), 8, 256)
    stats = collect(model, windows, 4, types.SimpleNamespace(reporter=Reporter(quiet=True)))
    importance = backend.imatrix_entries(stats.mean_sq)
    f16 = tmp / "f16.gguf"
    gguf_file.write_f16_gguf(model, src, f16, "t", "gpt-2")

    def weights(path: Path) -> dict[str, np.ndarray]:
        return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
                    [int(n) for n in reversed(t.shape)])
                for t in gguf.GGUFReader(str(path)).tensors if t.name in importance}

    ref = weights(f16)
    errors = {}
    for label, bundle in bundles.items():
        q = weights(bundle / "model" / "model.gguf")
        errors[label] = {n: float((((ref[n] - q[n]) ** 2) * importance[n][None, :]).sum())
                         for n in importance}
    return errors


def test_imatrix_reaches_the_quantizer_and_lowers_the_error_it_weighs(build_for, example,
                                                                      tmp_path):
    """The imatrix reaches llama.cpp's quantizer under the right tensor names: the
    importance-weighted rounding error, which it exists to lower, is lower with it in
    nearly every tensor and in total (an unmatched name leaves a tensor as plain). The
    end-to-end KL on this small model moves by noise either way (8.6e-4 against 8.9e-4
    on one machine, 9.6e-4 against 9.3e-4 on another): no more than 10% worse."""
    a, b = build_for("cpu-gguf-q4_k_m"), build_for("cpu-gguf-q4_k_m", "gguf-export.imatrix=false")
    with_imatrix, plain = manifest_of(a), manifest_of(b)
    assert plain["quantization"]["imatrix"] is False
    errors = imatrix_weighted_errors(example, {"imatrix": a, "plain": b}, tmp_path)
    assert with_imatrix["quantization"]["imatrix_tensors"] == len(errors["plain"])
    lower = [n for n in errors["plain"] if errors["imatrix"][n] < errors["plain"][n]]
    assert len(lower) >= 0.9 * len(errors["plain"]), (lower, errors)
    assert sum(errors["imatrix"].values()) < 0.95 * sum(errors["plain"].values()), errors
    assert with_imatrix["quality"]["kl_divergence"] <= 1.1 * plain["quality"]["kl_divergence"]


def test_a_model_llama_cpp_cannot_take_is_refused_before_any_pass(example, tmp_path):
    """A Llama with YaRN-style 'dynamic' rope scaling: dwc's torch runtime takes it, the
    GGUF writer does not map it."""
    src = tmp_path / "dynamic-rope"
    shutil.copytree(example / "checkpoint", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps(cfg))
    bf = write_buildfile(tmp_path / "bf", example, model=str(src))
    result = dwc("build", bf, "-t", "cpu-gguf-q8_0", "-o", tmp_path / "out")
    assert_clean_error(result, 2, "rope scaling 'dynamic'", "GGUF")
    assert not (tmp_path / "out").exists()
    assert "[1/" not in result.stdout  # no pass ran


def test_qwen2_builds_end_to_end(example, tmp_path):
    """dwc build -t cpu-gguf-q8_0 on a (small, random) Qwen2: arch qwen2 in the file, q/k/v
    biases, gate measured in llama.cpp."""
    import gguf

    _, src = tiny(example, tmp_path, "qwen2")
    bf = write_buildfile(tmp_path / "bf", example, model=str(src))
    result = dwc("build", bf, "-t", "cpu-gguf-q8_0", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model" / "model.gguf"))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen2"
    assert "blk.0.attn_q.bias" in {t.name for t in reader.tensors}
    assert manifest_of(tmp_path / "out")["quality"]["passed"]


def test_bench_reports_llama_cpp_against_transformers(build_for, tmp_path):
    result = dwc("bench", build_for("cpu-gguf-q4_k_m"), "--num-prompts", "2",
                 "--input-len", "32", "--output-len", "8", "--json", "--out", tmp_path)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["prompt_tok_s"] > 0 and data["generation_tok_s"] > 0
    assert data["transformers"]["generation_tok_s"] > 0
    assert (tmp_path / "bench.json").is_file()
