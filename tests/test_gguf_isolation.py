"""llama.cpp kept where a native crash cannot take dwc down (issue 17): the child process
(dwc/backends/gguf/child.py), a crash in each place dwc calls llama.cpp through the CLI,
and the Qwen2 shape that crashed llama.cpp built to every GGUF target."""

from __future__ import annotations

import json

import gguf
import pytest

from tests import crashing
from tests.conftest import ROOT, assert_clean_error, dwc, manifest_of, write_buildfile
from tests.qwen2_shape import cached_qwen2_shape
from tests.test_gguf import _perplexity
from dwc.backends.gguf import llama as backend
from dwc.backends.gguf import child as gguf_child

BUDGETS = {"cpu-gguf-f16": 1.0, "cpu-gguf-q8_0": 1.0, "cpu-gguf-q4_k_m": 5.0}  # test_gguf's


def test_the_child_returns_results_and_raises_the_childs_errors():
    import os

    with gguf_child.LlamaProcess("testing", "x.gguf") as child:
        assert child.call(crashing.add, 2, 3) == 5
        assert child.call(crashing.pid) == child.call(crashing.pid) != os.getpid()  # one child
        with pytest.raises(Exception) as info:
            child.call(crashing.refuse, "no such tokenizer")
    assert type(info.value).__name__ == "BadInput" and info.value.exit_code == 2
    assert str(info.value) == "no such tokenizer"


def test_a_child_killed_by_a_signal_is_one_error_naming_it():
    with pytest.raises(gguf_child.LlamaCrashed) as info:
        gguf_child.run("evaluating", "bundles/x/model/model.gguf", crashing.segfault)
    assert info.value.message == "llama.cpp died (SIGSEGV) evaluating bundles/x/model/model.gguf"
    assert info.value.exit_code == 1


@pytest.fixture(scope="module")
def shape(example):
    """The crashing shape's checkpoint, trained once and cached under build/."""
    return cached_qwen2_shape(example, ROOT / "build" / "test-fixtures")


@pytest.fixture(scope="module")
def shape_build(example, shape, tmp_path_factory):
    """The shape's build file, and its bundle for each GGUF target (built once)."""
    folder = tmp_path_factory.mktemp("qwen2-shape")
    bf = write_buildfile(folder, example, model=str(shape), **{"evaluation.samples": 16})
    bundles = {}
    for target in BUDGETS:
        out = folder / target
        result = dwc("build", bf, "-t", target, "-o", out)
        assert result.exit_code == 0, result.stderr
        bundles[target] = out
    return bf, bundles


def _field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(value[0])


@pytest.mark.parametrize("target", list(BUDGETS))
def test_the_shape_that_crashed_llama_cpp_builds_and_meets_the_bounds(shape_build, target):
    bundle = shape_build[1][target]
    m = manifest_of(bundle)
    q = m["quality"]
    assert q["passed"] and q["delta_pct"] <= BUDGETS[target], q
    assert q["top1_agreement"] > 0.8, q
    reader = gguf.GGUFReader(str(bundle / "model" / "model.gguf"))
    assert _field(reader, "general.architecture") == "qwen2"
    assert (_field(reader, "qwen2.attention.head_count"),
            _field(reader, "qwen2.attention.head_count_kv"), _field(reader, "qwen2.block_count"),
            _field(reader, "qwen2.embedding_length")) == (8, 2, 6, 256)
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp uses token_embd
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    # the gate measured the shipped file in llama.cpp: the same perplexity from it here
    ppl = _perplexity(bundle / "model" / "model.gguf", m)
    assert abs(ppl - q["optimized"]) / q["optimized"] < 1e-3, (ppl, q["optimized"])
    # the launch files run llama.cpp the way dwc measured it
    assert " --no-repack " in (bundle / "serve" / "llama-server.sh").read_text()
    assert "--no-repack" in (bundle / "serve" / "Modelfile").read_text()


def test_llama_cpp_is_opened_without_repacking_and_the_default_restored(shape_build):
    """`Llama` takes no repacking argument: dwc hands it defaults with use_extra_bufts set
    while it constructs, and puts llama-cpp-python's own function back after."""
    from llama_cpp import llama_cpp as L

    default = L.llama_model_default_params
    path = shape_build[1]["cpu-gguf-q4_k_m"] / "model" / "model.gguf"
    for repack in (False, True):
        llm = backend.open_model(path, 64, repack=repack)
        try:
            assert llm.model_params.use_extra_bufts is repack
        finally:
            llm.close()
    assert L.llama_model_default_params is default and default().use_extra_bufts is True
    assert backend.REPACK is False  # dwc's own runs (evaluate, bench) use the default


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("where, sets, doing", [
    ("_window_logits", ["evaluation.samples=4"], "evaluating"),        # evaluate, cache miss
    ("_quantize_here", ["gguf-export.imatrix=false"], "quantizing to Q4_K_M"),
])
def test_a_llama_cpp_crash_in_a_build_is_one_line_exit_1_and_no_bundle(
        shape_build, monkeypatch, tmp_path, where, sets, doing):
    monkeypatch.setattr(backend, where, crashing.segfault)  # what the child is sent
    out = tmp_path / "out"
    args = [a for s in sets for a in ("--set", s)]
    result = dwc("build", shape_build[0], "-t", "cpu-gguf-q4_k_m", "-o", out, *args)
    line = assert_clean_error(result, 1, f"llama.cpp died (SIGSEGV) {doing} ", ".gguf")
    assert "internal error" not in line
    assert not out.exists() and _leftovers(out) == []


def test_a_llama_cpp_crash_in_bench_is_one_line_exit_1(shape_build, monkeypatch, tmp_path):
    from dwc.backends.gguf import bench as bench_gguf

    monkeypatch.setattr(bench_gguf, "llama_bench", crashing.segfault)
    bundle = shape_build[1]["cpu-gguf-q8_0"]
    result = dwc("bench", bundle, "--num-prompts", "1", "--out", tmp_path / "b")
    assert_clean_error(result, 1, "llama.cpp died (SIGSEGV) benchmarking",
                       str(bundle / "model" / "model.gguf"))
    assert not (tmp_path / "b" / "bench.json").exists()


def test_bench_of_the_shape_runs_in_the_child(shape_build, tmp_path):
    result = dwc("bench", shape_build[1]["cpu-gguf-q8_0"], "--num-prompts", "1",
                 "--input-len", "16", "--output-len", "4", "--no-baseline", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["prompt_tok_s"] > 0 and data["generation_tok_s"] > 0
