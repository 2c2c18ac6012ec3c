"""The EAGLE head (docs/SPECULATION.md, "eagle"): its shape and what it shares with the
target, training, the runtime proposer (lossless greedy and sampled, the same drafts as
the build measured), the bundle's files and the refusals."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams
from tests.conftest import assert_clean_error, dwc, manifest_of, write_buildfile
from tests.test_runtime import PROMPTS
from tests.test_speculative import CHI2_999, MORE_PROMPTS, chi_square, joint_last_two, tiny_pair


def load_target(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def target(example):
    return load_target(example / "checkpoint")


@pytest.fixture(scope="module")
def trained(target, example, tmp_path_factory):
    """A head trained briefly on the calibration text (40 steps): (head, its folder)."""
    from types import SimpleNamespace

    from dwc.compiler.eagle import train_head
    from dwc.compiler.ui import Reporter
    from dwc.model.eagle_head import EagleHead
    from dwc.model.loading import load_tokenizer
    from dwc.passes.distill_draft import DistillOptions
    from dwc.quality.data import token_windows

    head = EagleHead.for_target(target)
    windows = token_windows(example / "calib.txt", load_tokenizer(example / "checkpoint"),
                            64, 128)
    ctx = SimpleNamespace(reporter=Reporter(quiet=True))
    info = train_head(head, target, windows, DistillOptions(eagle_steps=40), ctx)
    folder = tmp_path_factory.mktemp("eagle-head")
    head.save(folder)
    return head, folder, info


def test_head_shapes_and_what_it_shares(target, tmp_path):
    """fc fuses the three tapped layers (EAGLE-3's low, mid, high), fuse takes the token
    embedding and that feature, one decoder layer of the target's class; the embedding,
    final norm, rotary tables and LM head are the target's own modules, not parameters
    of the head and not in its files."""
    from dwc.model.eagle_head import EagleHead, load_head, tap_layers, tapped_forward

    assert tap_layers(4) == (1, 2, 3) and tap_layers(32) == (2, 16, 29)
    head = EagleHead.for_target(target)
    h = target.config.hidden_size
    assert head.fc.weight.shape == (h, 3 * h) and head.fuse.weight.shape == (h, 2 * h)
    assert type(head.layer) is type(target.model.layers[0])
    assert head.shared.lm_head is target.lm_head and head.shared.embed is target.model.embed_tokens
    assert head.shared.norm is target.model.norm
    layer = sum(p.numel() for p in target.model.layers[0].parameters())
    assert sum(p.numel() for p in head.parameters()) == 5 * h * h + layer
    assert all(k.split(".")[0] in ("fc", "fuse", "layer") for k in head.state_dict())
    ids = torch.randint(1, 4000, (2, 24))
    tapped, last, logits = tapped_forward(target, ids, head.taps)
    assert tapped.shape == (2, 24, 3 * h) and last.shape == (2, 24, h)
    assert torch.allclose(target.lm_head(target.model.norm(last)), logits)
    o = head(ids, head.features(tapped), torch.arange(24)[None].expand(2, -1))
    assert o.shape == (2, 24, h) and head.logits(o).shape == (2, 24, target.config.vocab_size)
    head.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eagle.json", "eagle.safetensors"]
    again = load_head(tmp_path, target)
    assert again.shared.lm_head is target.lm_head
    bf16 = {k: v.to(torch.bfloat16).float() for k, v in head.state_dict().items()}
    assert all(torch.equal(again.state_dict()[k], v) for k, v in bf16.items())


def test_training_reduces_the_loss_and_raises_acceptance(target, trained, example):
    """40 steps lower the two-step loss on held-out text and the head's drafts agree with
    the target's greedy continuation more often than its initialisation's."""
    from types import SimpleNamespace

    from dwc.compiler.eagle import head_loss, measure_head
    from dwc.compiler.speculation import positions
    from dwc.compiler.ui import Reporter
    from dwc.model.eagle_head import EagleHead
    from dwc.model.loading import load_tokenizer
    from dwc.passes.distill_draft import DistillOptions
    from dwc.quality.data import token_windows

    head, _, info = trained
    assert info["steps"] == 40 and info["loss_last"] < info["loss_first"]
    held_out = torch.stack(token_windows(example / "eval.txt",
                                         load_tokenizer(example / "checkpoint"), 4, 128))
    fresh = EagleHead.for_target(target)
    with torch.no_grad():
        before, after = (float(head_loss(h, target, held_out, 0.5)) for h in (fresh, head))
    assert after < 0.9 * before, (before, after)
    opts = DistillOptions(positions=32, max_k=4)
    ctx = SimpleNamespace(reporter=Reporter(quiet=True), artifacts=SimpleNamespace(quantized=None))
    starts = positions(target, token_windows(example / "eval.txt", load_tokenizer(
        example / "checkpoint"), 8, 256), opts.positions, opts.max_k)
    tau = [measure_head(h, target, starts, ctx, opts, {})["per_k"]["tau"][3]
           for h in (fresh, head)]
    assert tau[1] > tau[0], tau


def eagle_engine(model_dir, head_dir, k: int = 4, **kw) -> Engine:
    return Engine(model_dir, EngineConfig(device="cpu", **kw), draft_dir=head_dir, draft_k=k)


def test_greedy_is_token_identical_and_the_runtime_drafts_what_was_measured(
        target, trained, example):
    """Batch 12 and batch 1: the same tokens as without speculation, every block back;
    the runtime's drafts at each verification step are the head's own greedy chain over
    the target's hidden states (EagleHead.draft, what the build measures)."""
    from dwc.model.eagle_head import tapped_forward

    head, folder, _ = trained
    model = example / "checkpoint"
    params = SamplingParams(max_tokens=33, ignore_eos=True)
    plain = Engine(model, EngineConfig(device="cpu")).generate(MORE_PROMPTS, params)
    spec = eagle_engine(model, folder)
    seen = []
    propose = spec.drafter.propose

    def recording(chunks, blocks):
        propose(chunks, blocks)
        seen.extend((c.seq.tokens[:c.start + 1], list(c.draft)) for c in chunks
                    if c.lookahead == 4)
    spec.drafter.propose = recording
    outs = spec.generate(MORE_PROMPTS, params)
    assert [o.output_ids for o in outs] == [o.output_ids for o in plain]
    for prompt, want in zip(MORE_PROMPTS[:4], plain):
        assert spec.generate([prompt], params)[0].output_ids == want.output_ids
    stats = spec.speculation()
    assert stats["method"] == "eagle" and stats["steps"] > 0 and stats["accepted"] > 0
    assert spec.blocks.num_free == len(spec.blocks.blocks)
    same = 0
    for prefix, drafted in seen[:40]:
        ids = torch.tensor(prefix)
        with torch.inference_mode():
            tapped = tapped_forward(target, ids[None], head.taps)[0][0]
        same += head.draft(ids, tapped, 4) == drafted
    assert same >= 0.95 * min(len(seen), 40), (same, len(seen))


def test_preemption_and_prefix_sharing_keep_it_lossless(trained, example):
    """A cache too small for the batch (preemption mid-speculation) and shared prefixes
    (the head reads zeros for features the target did not compute): same tokens, no
    block leaked."""
    _, folder, _ = trained
    model = example / "checkpoint"
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = [PROMPTS[2] + str(i) for i in range(6)] + MORE_PROMPTS[4:10]
    plain = Engine(model, EngineConfig(device="cpu")).generate(prompts, params)
    spec = eagle_engine(model, folder, k=5, num_blocks=20, block_size=8,
                        max_num_batched_tokens=64)
    outs = spec.generate(prompts, params)
    assert [o.output_ids for o in outs] == [o.output_ids for o in plain]
    assert spec.scheduler.preemptions > 0 and spec.blocks.hits > 0
    assert spec.blocks.num_free == 20
    assert all(b.ref_count == 0 for b in spec.blocks.blocks)


def test_features_keep_what_a_copy_would_and_gather_in_one_go():
    """Features keeps references into the step outputs instead of copies: under random
    puts (contiguous, overlapping, restarting) and drops it holds what a plain per
    position copy holds, and a Gather over several sequences returns those rows, zeros
    where nothing is kept."""
    import random

    from dwc.runtime.eagle import Features, Gather

    rng = random.Random(0)
    for _ in range(20):
        state, ref, ref_base = Features(), [], 0
        for _ in range(40):
            if rng.random() < 0.7:
                start = max(0, ref_base + rng.randrange(-2, len(ref) + 3))
                n = rng.randrange(1, 5)
                g = torch.randn(n + 3, 2)
                row = rng.randrange(0, 4)
                row = min(row, g.shape[0] - n)
                state.put(start, g, row, n)
                new = [g[row + i] for i in range(n)]
                if not ref or not ref_base <= start <= ref_base + len(ref):
                    ref_base, ref = start, new
                else:
                    ref = ref[:start - ref_base] + new
            else:
                pos = ref_base + rng.randrange(-1, len(ref) + 2)
                state.drop_before(pos)
                if pos > ref_base:
                    ref, ref_base = ref[pos - ref_base:], pos
            gather, expected = Gather(), []
            for pos in range(ref_base - 2, ref_base + len(ref) + 2):
                gather.add(state.at(pos))
                i = pos - ref_base
                expected.append(ref[i] if 0 <= i < len(ref) else torch.zeros(2))
            assert torch.equal(gather.rows(torch.zeros(1, 2)), torch.stack(expected))


def test_sampled_output_follows_the_target_distribution(tmp_path):
    """The rejection rule with the head's q: 4,000 samples of 4 tokens at temperature 1,
    K = 2, from a random 2-layer target and a random head for it; tokens 2 and 3 (a
    verification step) follow the target's exact joint distribution (64 cells)."""
    from dwc.model.eagle_head import EagleHead

    target_dir, _ = tiny_pair(tmp_path)
    torch.manual_seed(3)
    head = EagleHead.for_target(load_target(target_dir))
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    head.save(tmp_path / "head")
    prompt, n = [1, 2, 3], 4000
    spec = eagle_engine(target_dir, tmp_path / "head", k=2, max_num_seqs=512,
                        num_blocks=2048, block_size=4)
    params = [SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True, seed=i)
              for i in range(n)]
    outs = spec.generate([prompt] * n, params)
    counts = Counter(tuple(o.output_ids[1:3]) for o in outs)
    stats = spec.speculation()
    assert stats["steps"] >= n and 0.1 < stats["acceptance_rate"] < 0.9, stats
    assert chi_square(counts, joint_last_two(target_dir, prompt, 8), n) < CHI2_999[63]


def eagle_bundle(bundle, head_dir, dest, k: int = 3):
    """A copy of the shared bundle whose manifest chose an EAGLE head with K = k."""
    from dwc.bundle.hashing import sha256_file

    shutil.copytree(bundle, dest)
    shutil.copytree(head_dir, dest / "draft")
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["draft"] = {"method": "eagle", "k": k, "acceptance_rate": 0.5,
                         "mean_accepted_tokens": 2.0, "cost_ratio": 0.5, "params": 1}
    for f in (dest / "draft").iterdir():
        manifest["files"][f"draft/{f.name}"] = {"sha256": sha256_file(f),
                                                "bytes": f.stat().st_size}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_a_bundle_with_a_head_is_served_with_it(bundle, trained, tmp_path):
    """from_bundle loads draft/'s head with the manifest's K; `dwc bench` speculates with
    it and --no-draft turns it off; inspect names the method; vllm.sh does not
    speculate (vLLM cannot read the head)."""
    from dwc.backends.torch_triton.emit import vllm_serve_args
    from dwc.runtime.eagle import EagleProposer

    copy = eagle_bundle(bundle, trained[1], tmp_path / "b")
    engine = Engine.from_bundle(copy, EngineConfig(device="cpu"))
    assert isinstance(engine.drafter, EagleProposer) and engine.drafter.k == 3
    assert engine.runner.decoder.taps == trained[0].taps
    args = ("bench", copy, "--num-prompts", 3, "--input-len", 24, "--output-len", 12,
            "--requests", 2, "--rps", 50, "--no-baseline", "--json")
    spec = json.loads(dwc(*args).stdout)["speculation"]
    assert spec["method"] == "eagle" and spec["k"] == 3 and spec["steps"] > 0
    assert json.loads(dwc(*args, "--no-draft").stdout)["speculation"] is None
    assert "speculation eagle (" in dwc("inspect", copy).stdout
    assert "--speculative-config" not in vllm_serve_args(manifest_of(copy))


@pytest.fixture(scope="module")
def measured(example, tmp_path_factory):
    """A build measuring the head against n-gram lookup (a short training): on the
    example's repetitive greedy text n-gram lookup wins, the head is in the table."""
    folder = tmp_path_factory.mktemp("eagle-build")
    bf = write_buildfile(folder, example, draft="auto", **{"passes": {"distill-draft": {
        "candidates": ["eagle", "ngram"], "eagle_steps": 30, "positions": 64}}})
    result = dwc("build", bf, "-t", "cpu-bf16", "-o", folder / "bundle")
    assert result.exit_code == 0, result.stderr
    return folder / "bundle"


def test_the_head_is_a_measured_candidate(measured, example):
    """The manifest's table holds the head measured at the same positions as n-gram
    lookup, with its interval, its training and c by the CPU rule: the head's own
    weights, the final norm and the LM head over the target's weights, in bytes."""
    from dwc.model.eagle_head import EagleHead

    m = manifest_of(measured)
    table = {c["method"]: c for c in m["draft"]["candidates"]}
    assert set(table) == {"eagle", "ngram"}
    e = table["eagle"]
    assert e["positions"] == table["ngram"]["positions"] == 64
    assert e["tau_ci95"][0] <= e["mean_accepted_tokens"] <= e["tau_ci95"][1]
    assert e["training"]["steps"] == 30 and e["taps"] == [1, 2, 3]
    target = load_target(example / "checkpoint")
    own = sum(p.numel() for p in EagleHead.for_target(target).parameters())
    shared = target.lm_head.weight.numel() + target.model.norm.weight.numel()
    expected = 2 * (own + shared) / (2 * sum(p.numel() for p in target.parameters()))
    assert e["params"] == own and abs(e["cost_ratio"] - round(expected, 4)) < 1e-4
    report = json.loads((measured / "reports" / "draft.json").read_text())
    assert [c["method"] for c in report["per_candidate"]] == ["eagle", "ngram"]
    if m["draft"]["method"] == "eagle":
        assert "draft/eagle.safetensors" in m["files"]
    else:
        assert not any(f.startswith("draft/") for f in m["files"])
        assert "why_not" in e


def test_a_head_is_trained_over_a_quantized_target(example, tmp_path):
    """An FP8 target's layers hold FP8 weights and scales: the fresh head's layer starts
    from the unquantized model's top layer instead (the build failed loading the
    quantized layer's state into a plain one; found by speculative_gpu.py --smoke)."""
    bf = write_buildfile(tmp_path, example, draft="auto", **{"passes": {"distill-draft": {
        "candidates": ["eagle"], "eagle_steps": 5, "positions": 32, "ship": "eagle"}}})
    result = dwc("build", bf, "-t", "h100-fp8", "-o", tmp_path / "b")
    assert result.exit_code == 0, result.stderr
    m = manifest_of(tmp_path / "b")
    (head,) = m["draft"]["candidates"]
    assert head["method"] == "eagle" and head["training"]["steps"] == 5
    # shipped (distill-draft.ship) whatever five steps of training projected, and served
    assert m["draft"]["method"] == "eagle" and "draft/eagle.safetensors" in m["files"]
    engine = Engine.from_bundle(tmp_path / "b", EngineConfig(device="cpu"))
    assert engine.speculation()["method"] == "eagle"
    out = engine.generate(["def main():\n"], SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out[0].output_ids) == 8


@pytest.mark.parametrize("option, value, fragment", [
    ("ship", "medusa", "distill-draft.ship: 'medusa': auto or one of the candidates"),
    ("eagle_steps", 0, "distill-draft.eagle_steps: must be greater than 0"),
    ("eagle_lr", -1.0, "distill-draft.eagle_lr: must be greater than 0"),
    ("eagle_hidden_weight", -0.5, "distill-draft.eagle_hidden_weight: -0.5: must be 0 or more"),
    ("candidates", ["medusa"], "distill-draft.candidates: ['medusa']: choose from "
                               "draft_model, eagle, ngram"),
])
def test_bad_options_are_refused_in_one_line(example, tmp_path, option, value, fragment):
    bf = write_buildfile(tmp_path, example, draft="auto",
                         **{"passes": {"distill-draft": {option: value}}})
    assert_clean_error(dwc("build", bf, "-t", "cpu-bf16", "-o", tmp_path / "b"), 2, fragment)
    assert not (tmp_path / "b").exists()


def test_a_head_alone_is_refused_where_the_runtime_does_not_serve(example, tmp_path):
    bf = write_buildfile(tmp_path, example, draft="auto",
                         **{"passes": {"distill-draft": {"candidates": ["eagle"]}}})
    result = dwc("build", bf, "-t", "h100-trtllm-fp8", "-o", tmp_path / "b")
    assert_clean_error(result, 2, "distill-draft.candidates: [eagle]", "tensorrt-llm")


def test_piecewise_steps_keep_the_tapped_layers(trained, example):
    """The piecewise graphs' pieces (run uncaptured here, through the same static
    buffers the GPU's replays use) copy out the tapped layers: with them the head drafts
    exactly what it drafts over eager steps (the same accepted count), losslessly."""
    from dwc.runtime.piecewise_graphs import PiecewiseGraphs

    _, folder, _ = trained
    model = example / "checkpoint"
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = MORE_PROMPTS[:6]
    eager = eagle_engine(model, folder, max_num_batched_tokens=64)
    want = eager.generate(prompts, params)
    spec = eagle_engine(model, folder, max_num_batched_tokens=64)
    r = spec.runner
    page = r.block_size
    r.cache = [torch.cat([c, torch.zeros_like(c[:, :page])], dim=1) for c in r.cache]
    pieces = PiecewiseGraphs(r.decoder, r.cache, len(spec.blocks.blocks) * page, [8, 24, 64])
    pieces.uncaptured()
    r.pieces, used, run = pieces, [], pieces.run
    pieces.run = lambda batch: used.append(1) or run(batch)
    outs = spec.generate(prompts, params)
    assert used  # the steps with prompt tokens went through the pieces
    assert [o.output_ids for o in outs] == [o.output_ids for o in want]
    assert spec.speculation()["accepted"] == eager.speculation()["accepted"] > 0


def test_graphs_captured_without_the_taps_are_dropped(trained, example):
    """A target runner whose graphs were captured before a head asked for its layers
    (not an Engine's, which passes the taps first) runs eagerly rather than without them."""
    from dwc.runtime.eagle import EagleProposer

    _, folder, _ = trained
    eng = Engine(example / "checkpoint", EngineConfig(device="cpu"))
    eng.runner.graphs = eng.runner.pieces = object()  # stand-ins for captured graphs
    EagleProposer.load(folder, eng.runner, 16, 16, 2)
    assert eng.runner.graphs is None and eng.runner.pieces is None


@pytest.mark.gpu
def test_gpu_engine_with_a_head_keeps_its_graphs_and_is_token_identical(trained, example):
    """On a GPU (float32, so greedy ties cannot differ): the same tokens with and without
    the head; the engine captured its decode and piecewise graphs with the tapped layers,
    and its drafts are those of an eager engine (the same accepted count)."""
    _, folder, _ = trained
    model = example / "checkpoint"
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = Engine(model, EngineConfig(device="cuda", dtype="float32")).generate(
        MORE_PROMPTS, params)
    spec = Engine(model, EngineConfig(device="cuda", dtype="float32"), draft_dir=folder,
                  draft_k=4)
    assert spec.runner.graphs is not None and spec.runner.pieces is not None
    assert spec.runner.graphs.tapped  # kept by every captured size
    outs = spec.generate(MORE_PROMPTS, params)
    assert [o.output_ids for o in outs] == [o.output_ids for o in plain]
    eager = Engine(model, EngineConfig(device="cuda", dtype="float32", cuda_graphs=False),
                   draft_dir=folder, draft_k=4)
    eager.generate(MORE_PROMPTS, params)
    assert spec.speculation()["accepted"] == eager.speculation()["accepted"] > 0


def test_a_head_on_another_shape_is_lossless(example, tmp_path):
    """Qwen2 (q/k/v biases, head_dim 32, tied embeddings, 6 layers): the head is made,
    trained and served the same way, and greedy output stays token-identical."""
    from types import SimpleNamespace

    from dwc.compiler.eagle import train_head
    from dwc.compiler.ui import Reporter
    from dwc.model.eagle_head import EagleHead
    from dwc.model.loading import load_tokenizer
    from dwc.passes.distill_draft import DistillOptions
    from dwc.quality.data import token_windows
    from tests.qwen2_shape import cached_qwen2_shape

    root = Path(__file__).resolve().parents[1]
    model = cached_qwen2_shape(example, root / "build" / "test-fixtures")
    target = load_target(model)
    head = EagleHead.for_target(target)
    windows = token_windows(example / "calib.txt", load_tokenizer(model), 32, 128)
    info = train_head(head, target, windows, DistillOptions(eagle_steps=30),
                      SimpleNamespace(reporter=Reporter(quiet=True)))
    assert info["loss_last"] < info["loss_first"]
    head.save(tmp_path)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = Engine(model, EngineConfig(device="cpu")).generate(PROMPTS, params)
    engine = eagle_engine(model, tmp_path, k=3)
    spec = engine.generate(PROMPTS, params)
    assert [o.output_ids for o in spec] == [o.output_ids for o in plain]
    assert engine.speculation()["method"] == "eagle" and engine.speculation()["drafted"] > 0
