"""The distill-draft pass on the example model: a measured draft, its report, its refusals."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile


@pytest.fixture(scope="module")
def drafted(example, tmp_path_factory):
    folder = tmp_path_factory.mktemp("draft")
    bf = write_buildfile(folder, example, draft="auto", **{"passes": {"distill-draft": {
        "steps": 60, "positions": 48}}})
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", folder / "bundle")
    assert result.exit_code == 0, result.stderr
    return folder / "bundle"


def test_draft_is_measured_and_k_is_chosen_by_the_rule(drafted):
    m = manifest_of(drafted)
    draft = m["draft"]
    assert {"k", "acceptance_rate", "mean_accepted_tokens", "cost_ratio", "params"} <= set(draft)
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
    before = measure(make_draft(target, 0), target, ctx, opts)["per_k"]["tau"][3]
    draft = make_draft(target, 0)
    from dwc.quality.data import token_windows
    windows = token_windows(build.calibration.data, ctx.artifacts.tokenizer, 16, 256)
    train(draft, target, windows, opts, ctx)
    after = measure(draft, target, ctx, opts)["per_k"]["tau"][3]
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
