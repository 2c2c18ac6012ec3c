"""The distill-draft pass on the example model: measured candidates (a distilled draft,
n-gram lookup), the choice between them, the report, the refusals."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile


@pytest.fixture(scope="module")
def drafted(example, tmp_path_factory):
    folder = tmp_path_factory.mktemp("draft")
    bf = write_buildfile(folder, example, draft="auto", **{"passes": {"distill-draft": {
        "steps": 60, "positions": 64, "candidates": ["draft_model"]}}})
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", folder / "bundle")
    assert result.exit_code == 0, result.stderr
    return folder / "bundle"


def test_draft_is_measured_and_k_is_chosen_by_the_rule(drafted):
    m = manifest_of(drafted)
    draft = m["draft"]
    assert {"k", "acceptance_rate", "mean_accepted_tokens", "cost_ratio", "params"} <= set(draft)
    assert draft["method"] == "draft_model" and draft["positions"] == 64
    assert [c["method"] for c in draft["candidates"]] == ["draft_model"]
    lo, hi = draft["tau_ci95"]
    assert lo <= draft["mean_accepted_tokens"] <= hi and draft["speedup_ci95"][0] > 1
    report = json.loads((drafted / "reports" / "draft.json").read_text())
    per_k = report["per_k"]
    tau, ks, c = per_k["tau"], per_k["k"], report["cost_ratio"]
    assert all(1.0 <= t <= 1 + k for t, k in zip(tau, ks))
    assert tau == sorted(tau)  # more drafted tokens never confirm fewer
    speedup = [t / (1 + k * c) for t, k in zip(tau, ks)]
    assert draft["k"] == ks[max(range(len(ks)), key=speedup.__getitem__)]
    assert draft["mean_accepted_tokens"] == tau[draft["k"] - 1]
    assert tau[0] > 1.2  # the distilled draft agrees with the target well above chance
    assert (drafted / "reports" / "draft.png").exists()


def test_draft_bundle_files_and_cost_ratio(drafted, example):
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(drafted / "draft")
    target = AutoModelForCausalLM.from_pretrained(example / "checkpoint")
    assert draft.config.vocab_size == target.config.vocab_size
    assert draft.config.num_hidden_layers == 1  # max(1, 4 // 8)
    m = manifest_of(drafted)
    assert m["draft"]["params"] == sum(p.numel() for p in draft.parameters())
    # No GPU here: c = the draft's bf16 weight bytes read per token (all but the embedding)
    # over the bf16 target's.
    embed = draft.model.embed_tokens.weight.numel()
    expected = 2 * (sum(p.numel() for p in draft.parameters()) - embed) / \
        (2 * sum(p.numel() for p in target.parameters()))
    assert abs(m["draft"]["cost_ratio"] - round(expected, 4)) < 1e-4
    assert "draft/model.safetensors" in m["files"] and "draft/tokenizer.json" in m["files"]


def test_distillation_raises_acceptance(example):
    """The distilled draft agrees with the target more often than its initialisation."""
    from types import SimpleNamespace

    from dwc.compiler.speculation import positions
    from dwc.passes.distill_draft import DistillOptions, make_draft, measure, train
    from dwc.compiler.buildfile import load_buildfile
    from dwc.model.loading import load_model, load_tokenizer
    from dwc.model.checkpoint import model_info
    from dwc.compiler.artifacts import Artifacts
    from dwc.compiler.ui import Reporter

    info = model_info(example / "checkpoint")
    target = load_model(info, "float32")
    build = load_buildfile(example / "model.yaml")
    ctx = SimpleNamespace(build=build, reporter=Reporter(quiet=True), artifacts=Artifacts(
        tokenizer=load_tokenizer(example / "checkpoint")), compute_device="cpu")
    opts = DistillOptions(steps=40, positions=32, max_k=4)
    from dwc.quality.data import token_windows
    starts = positions(target, token_windows(build.evaluation.data, ctx.artifacts.tokenizer,
                                             8, 256), opts.positions, opts.max_k)
    before = measure(make_draft(target, 0), target, starts, ctx, opts)["per_k"]["tau"][3]
    draft = make_draft(target, 0)
    windows = token_windows(build.calibration.data, ctx.artifacts.tokenizer, 16, 256)
    train(draft, target, windows, opts, ctx)
    after = measure(draft, target, starts, ctx, opts)["per_k"]["tau"][3]
    assert after > before, (before, after)


def test_draft_none_skips_and_another_vocabulary_is_refused(example, tmp_path):
    from tests.test_checkpoint import tiny_checkpoint

    none = write_buildfile(tmp_path / "a", example)  # the example says draft: none
    assert dwc("build", none, "-t", "cpu-bf16", "-o", tmp_path / "a" / "b").exit_code == 0
    assert manifest_of(tmp_path / "a" / "b")["draft"] is None
    other = tmp_path / "other"
    tiny_checkpoint(other, example, "llama")
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (other / "config.json").write_text(json.dumps(cfg))
    bf = write_buildfile(tmp_path / "c", example, draft=str(other))
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", tmp_path / "c" / "b")
    assert_clean_error(result, 2, "[distill-draft]", "vocabulary of 1000 tokens", "4096")
    assert not (tmp_path / "c" / "b").exists()


def test_bench_speculates_with_the_bundle_draft_and_no_draft_turns_it_off(drafted):
    """The bundle's draft is used by the runtime with the manifest's K; the pass's
    measured acceptance and the runtime's are reported side by side."""
    args = ("bench", drafted, "--num-prompts", 3, "--input-len", 24, "--output-len", 12,
            "--requests", 2, "--rps", 50, "--no-baseline", "--json")
    on = json.loads(dwc(*args).stdout)
    spec = on["speculation"]
    assert spec["k"] == manifest_of(drafted)["draft"]["k"] and spec["steps"] > 0
    assert 1.0 <= spec["mean_accepted_tokens"] <= 1 + spec["k"]
    off = json.loads(dwc(*args, "--no-draft").stdout)
    assert off["speculation"] is None


@pytest.mark.slow
def test_vllm_serve_command_speculates_with_the_draft(drafted, vllm_python):
    """serve/vllm.sh through vLLM's own `vllm serve` parser: the draft as vLLM spells it,
    with the K the build chose; a misspelt flag is refused by the same check."""
    from tests.test_vllm import probe_serve_args, serve_args

    args = serve_args(drafted)
    result = probe_serve_args(vllm_python, drafted, args)
    assert result.get("ok"), result
    k = manifest_of(drafted)["draft"]["k"]
    assert result["args"]["speculative_config"] == {"model": "draft", "num_speculative_tokens": k,
                                                    "method": "draft_model"}
    assert (drafted / "draft" / "config.json").exists()
    bad = [a.replace("--kv-cache-dtype", "--kv-cache-dtpe") for a in args]
    assert probe_serve_args(vllm_python, drafted, bad) == {"error": "SystemExit: 2"}


@pytest.fixture(scope="module")
def ngram_chosen(example, tmp_path_factory):
    """A build measuring n-gram lookup alone (no training): on the example's own greedy
    continuations, which repeat, it pays."""
    folder = tmp_path_factory.mktemp("ngram")
    bf = write_buildfile(folder, example, draft="auto", **{"passes": {"distill-draft": {
        "candidates": ["ngram"]}}})
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", folder / "bundle")
    assert result.exit_code == 0, result.stderr
    return folder / "bundle"


def test_ngram_chosen_by_measurement_is_served_with_its_k(ngram_chosen):
    """The manifest names n-gram lookup with the measured K (no draft/ written); `dwc
    bench` speculates with it and that K; `--no-draft` turns it off."""
    m = manifest_of(ngram_chosen)
    d = m["draft"]
    assert d["method"] == "ngram" and d["cost_ratio"] == 0.0 and d["positions"] >= 64
    assert d["speedup_ci95"][0] > 1 and "params" not in d
    # CPU example: the chosen method's mean accepted tokens per step >= 1.8 (issue 21)
    assert d["mean_accepted_tokens"] >= 1.8
    assert not any(f.startswith("draft/") for f in m["files"])
    args = ("bench", ngram_chosen, "--num-prompts", 3, "--input-len", 24, "--output-len", 24,
            "--requests", 2, "--rps", 50, "--no-baseline", "--json")
    spec = json.loads(dwc(*args).stdout)["speculation"]
    assert spec["method"] == "ngram" and spec["k"] == d["k"]
    assert json.loads(dwc(*args, "--no-draft").stdout)["speculation"] is None


@pytest.mark.slow
def test_vllm_serve_command_speculates_by_ngram(ngram_chosen, vllm_python):
    """serve/vllm.sh through vLLM's own parser: n-gram lookup as vLLM spells it."""
    from tests.test_vllm import probe_serve_args, serve_args

    result = probe_serve_args(vllm_python, ngram_chosen, serve_args(ngram_chosen))
    assert result.get("ok"), result
    assert result["args"]["speculative_config"] == {
        "method": "ngram", "num_speculative_tokens": manifest_of(ngram_chosen)["draft"]["k"],
        "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def test_unknown_candidate_is_refused(example, tmp_path):
    bf = write_buildfile(tmp_path, example, draft="auto", **{"passes": {"distill-draft": {
        "candidates": ["medusa"]}}})
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", tmp_path / "b")
    assert_clean_error(result, 2, "distill-draft.candidates", "medusa",
                       "draft_model, eagle, ngram")


def test_candidate_table_and_intervals_from_accepted_counts():
    """tau(K) = 1 + mean(min(a, K)); the best K by tau / (1 + K c); the interval holds the
    estimate and narrows with more positions; the same counts give the same table."""
    from dwc.compiler.speculation import candidate

    counts = [0, 1, 2, 3, 4, 4, 4, 0] * 8
    c = candidate("draft_model", counts, 4, 0.1)
    assert c["per_k"]["tau"] == [1 + sum(min(a, k) for a in counts) / len(counts)
                                 for k in (1, 2, 3, 4)]
    speedup = [t / (1 + k * 0.1) for t, k in zip(c["per_k"]["tau"], (1, 2, 3, 4))]
    assert c["k"] == 1 + max(range(4), key=speedup.__getitem__)
    lo, hi = c["tau_ci95"]
    assert lo < c["mean_accepted_tokens"] < hi
    wide = candidate("draft_model", counts[:16], 4, 0.1)["tau_ci95"]
    assert wide[1] - wide[0] > hi - lo
    assert candidate("draft_model", counts, 4, 0.1) == c
    assert 0 < c["k_stability"] <= 1


def test_choice_needs_an_interval_above_one():
    """The highest projected speedup wins among candidates whose interval lies above 1;
    none when no candidate's does; every candidate says why it lost."""
    from dwc.compiler.speculation import candidate, choose

    good = candidate("ngram", [2, 3, 1, 4] * 40, 4, 0.0)
    costly = candidate("draft_model", [3, 4, 4, 4] * 40, 4, 1.0)  # tau ~4.7 / (1 + 4)
    chosen = choose([costly, good])
    assert chosen["method"] == "ngram" and chosen["k"] == good["k"]
    table = {c["method"]: c for c in chosen["candidates"]}
    assert table["ngram"]["chosen"] and "why_not" in table["draft_model"]
    rare = candidate("ngram", [0] * 60 + [1], 4, 0.0)  # tau 1.016, interval reaches 1
    none = choose([rare])
    assert none["method"] == "none" and none["k"] == 0
    assert "interval" in none["candidates"][0]["why_not"]
    # distill-draft.ship names the one to ship, whatever its projection
    shipped = choose([costly, good, rare], forced="draft_model")
    assert shipped["method"] == "draft_model"
    assert shipped["projected_speedup"] < good["projected_speedup"]  # not the best
    assert all("ship" in c["why_not"] for c in shipped["candidates"] if not c["chosen"])
