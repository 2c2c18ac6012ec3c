"""Speculative decoding: the accept/reject rule keeps the target's distribution, greedy
output is token-identical with and without a draft, rolled-back slots are all returned."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams
from dwc.runtime.speculative import accept, accept_greedy
from tests.test_runtime import PROMPTS

# Upper 0.1% points of the chi-square distribution (statistical tables), by degrees of
# freedom: a correct sampler fails one of these tests once in a thousand seeds; the seeds
# here are fixed, so a pass is reproducible.
CHI2_999 = {5: 20.515, 63: 103.442}

MORE_PROMPTS = PROMPTS + ["def read(path):\n    with open(path", "for i in range(",
                          "    return self._", "import re\n\nPATTERN = re.compile(r'",
                          "if __name__ == '__main__':\n", "class Error(Exception):\n    \"\"\"",
                          "    def __repr__(self):\n        return", "try:\n    import "]


def chi_square(counts: Counter, expected: dict, n: int) -> float:
    return sum((counts.get(x, 0) - n * p) ** 2 / (n * p) for x, p in expected.items())


def test_accept_rule_samples_the_target_distribution():
    """Fixed p (target) and q (draft) over 6 tokens, K = 3: the first token emitted
    follows p_1, and the second (when there is one) follows p_2. The draft's own
    distribution, used as a strawman, fails the same test by far."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 6, generator=g) * 1.5, -1).double()
    q = torch.softmax(torch.randn(3, 6, generator=g) * 1.5, -1).double()
    first, second, n = Counter(), Counter(), 20000
    accepted = 0
    for _ in range(n):
        drafted = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(3)]
        tokens, a = accept(p, q, drafted, g)
        assert tokens[:a] == drafted[:a] and len(tokens) == a + 1
        accepted += a
        first[tokens[0]] += 1
        if len(tokens) > 1:
            second[tokens[1]] += 1
    assert 0.2 < accepted / (3 * n) < 0.9  # both branches (accept, residual) are exercised
    p1 = {x: float(p[0, x]) for x in range(6)}
    assert chi_square(first, p1, n) < CHI2_999[5]
    n2 = sum(second.values())
    assert chi_square(second, {x: float(p[1, x]) for x in range(6)}, n2) < CHI2_999[5]
    assert chi_square(first, {x: float(q[0, x]) for x in range(6)}, n) > 10 * CHI2_999[5]


def test_accept_rule_is_greedy_at_temperature_zero():
    from dwc.runtime.sampler import distribution

    greedy = SamplingParams(temperature=0)
    target = torch.tensor([[0., 3, 1], [2, 0, 1], [0, 0, 5]])
    p = distribution(target, greedy)                      # argmax 1, 0, 2
    q = distribution(torch.tensor([[0., 9, 1], [0, 9, 1]]), greedy)  # drafts 1, 1
    assert accept(p, q, [1, 1]) == ([1, 0], 1)           # second rejected: target's 0
    q = distribution(torch.tensor([[0., 9, 1], [9, 0, 1]]), greedy)
    assert accept(p, q, [1, 0]) == ([1, 0, 2], 2)        # all accepted, plus the bonus


def test_greedy_closed_form_equals_the_rule_on_one_hot_inputs():
    """accept_greedy (the fast path) is accept() at temperature 0, on random cases."""
    from dwc.runtime.sampler import distribution

    g = torch.Generator().manual_seed(1)
    greedy = SamplingParams(temperature=0)
    for _ in range(300):
        k = int(torch.randint(1, 6, (1,), generator=g))
        target = torch.randn(k + 1, 3, generator=g)
        draft_logits = torch.randn(k, 3, generator=g)
        drafted = draft_logits.argmax(-1).tolist()
        want = accept(distribution(target, greedy), distribution(draft_logits, greedy), drafted)
        assert accept_greedy(target.argmax(-1).tolist(), drafted) == want


@pytest.fixture(scope="module")
def weak_draft(bundle, tmp_path_factory):
    """One untrained layer of the target: it agrees with the target only sometimes."""
    from transformers import AutoModelForCausalLM

    from dwc.passes.distill_draft import make_draft

    folder = tmp_path_factory.mktemp("weak-draft")
    target = AutoModelForCausalLM.from_pretrained(bundle / "model", dtype=torch.float32)
    make_draft(target, 1).save_pretrained(folder)
    return folder


def spec_engine(bundle, draft, k: int = 4, **kw) -> Engine:
    config = EngineConfig(device="cpu", **kw)
    return Engine(bundle / "model", config, draft_dir=draft, draft_k=k)


@pytest.mark.parametrize("draft_kind", ["weak", "self"])
def test_greedy_is_token_identical_with_and_without_speculation(bundle, weak_draft, draft_kind):
    """Batch 1 (one prompt at a time) and batch 12, a weak draft and the target itself as
    its own draft (every token accepted: the bonus-token path)."""
    draft = weak_draft if draft_kind == "weak" else bundle / "model"
    params = SamplingParams(max_tokens=33, ignore_eos=True)
    plain = Engine(bundle / "model", EngineConfig(device="cpu")).generate(MORE_PROMPTS, params)
    spec = spec_engine(bundle, draft)
    batched = spec.generate(MORE_PROMPTS, params)
    for want, got in zip(plain, batched):
        assert got.output_ids == want.output_ids
    for prompt, want in zip(MORE_PROMPTS[:4], plain):
        assert spec.generate([prompt], params)[0].output_ids == want.output_ids
    stats = spec.speculation()
    assert stats["steps"] > 0 and stats["drafted"] > 0
    if draft_kind == "self":
        assert stats["acceptance_rate"] > 0.95
        assert stats["mean_accepted_tokens"] > 4.0  # K = 4: nearly 5 tokens a step
    else:
        assert 0 < stats["acceptance_rate"] < 0.95
    assert spec.blocks.num_free == len(spec.blocks.blocks)


def test_speculation_under_preemption_and_prefix_sharing_leaks_no_block(bundle, weak_draft):
    """A cache too small for the batch forces preemption mid-speculation; shared prefixes
    reuse blocks both models filled. Same tokens as without a draft; every block back."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = [PROMPTS[2] + str(i) for i in range(6)] + MORE_PROMPTS[4:10]
    plain = Engine(bundle / "model", EngineConfig(device="cpu")).generate(prompts, params)
    spec = spec_engine(bundle, weak_draft, k=5, num_blocks=20, block_size=8,
                       max_num_batched_tokens=64)
    outs = spec.generate(prompts, params)
    assert [o.output_ids for o in outs] == [o.output_ids for o in plain]
    assert spec.scheduler.preemptions > 0 and spec.blocks.hits > 0
    assert spec.blocks.num_free == 20
    assert all(b.ref_count == 0 for b in spec.blocks.blocks)


def test_request_level_switch_and_stop_inside_accepted_tokens(bundle):
    """speculative=False runs plain decode steps (nothing drafted); EOS or max_tokens in
    the middle of an accepted run ends the sequence there."""
    spec = spec_engine(bundle, bundle / "model")
    off = spec.generate([PROMPTS[0]], SamplingParams(max_tokens=20, ignore_eos=True,
                                                     speculative=False))
    assert spec.speculation()["steps"] == 0
    on = spec.generate([PROMPTS[0]], SamplingParams(max_tokens=20, ignore_eos=True))
    assert on[0].output_ids == off[0].output_ids and spec.speculation()["steps"] > 0
    for n in (2, 3, 7):  # 1 + 4k never lands on these exactly: truncation inside a step
        out = spec.generate([PROMPTS[0]], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert out.output_ids == off[0].output_ids[:n] and out.finish_reason == "length"


def tiny_pair(folder, vocab: int = 8):
    """A random 2-layer target and a different random 1-layer draft over an 8-token
    vocabulary: their distributions overlap by about half, so the draft is often
    rejected."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    paths = []
    for name, layers, seed in (("target", 2, 1), ("draft", 1, 2)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.15, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
        model.generation_config.eos_token_id = None
        model.save_pretrained(folder / name)
        tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
        PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder / name)
        paths.append(folder / name)
    return paths


def joint_last_two(model_dir, prompt: list[int], vocab: int) -> dict:
    """Exact P(t2, t3) of sampling 3 tokens after `prompt` (t1 summed out)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    with torch.no_grad():
        def nxt(ids):
            return torch.softmax(model(torch.tensor([ids])).logits[0, -1], -1)
        joint = {}
        p1 = nxt(prompt)
        for t1 in range(vocab):
            p2 = nxt(prompt + [t1])
            for t2 in range(vocab):
                p3 = nxt(prompt + [t1, t2])
                for t3 in range(vocab):
                    joint[(t2, t3)] = joint.get((t2, t3), 0.0) + float(p1[t1] * p2[t2] * p3[t3])
    return joint


def test_sampled_output_follows_the_target_distribution(tmp_path):
    """4,000 samples of 4 tokens at temperature 1 with K = 2: token 1 comes from the
    prefill, tokens 2 and 3 from a verification step (accepted draft tokens, residual
    samples, bonus tokens); their joint distribution matches the target's exact one (64
    cells), not the draft's."""
    target, draft = tiny_pair(tmp_path)
    prompt, n = [1, 2, 3], 4000
    spec = Engine(target, EngineConfig(device="cpu", max_num_seqs=512, num_blocks=2048,
                                       block_size=4), draft_dir=draft, draft_k=2)
    params = [SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True, seed=i)
              for i in range(n)]
    outs = spec.generate([prompt] * n, params)
    counts = Counter(tuple(o.output_ids[1:3]) for o in outs)
    stats = spec.speculation()
    assert stats["steps"] >= n and 0.2 < stats["acceptance_rate"] < 0.9, stats
    assert chi_square(counts, joint_last_two(target, prompt, 8), n) < CHI2_999[63]
    assert chi_square(counts, joint_last_two(draft, prompt, 8), n) > 2 * CHI2_999[63]


def test_bundle_draft_is_used_and_can_be_switched_off(bundle, weak_draft, tmp_path):
    """from_bundle loads draft/ with the manifest's K; speculative=False leaves it out."""
    import shutil

    from dwc.bundle.hashing import sha256_file

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    shutil.copytree(weak_draft, copy / "draft")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["draft"] = {"k": 3, "acceptance_rate": 0.5, "mean_accepted_tokens": 2.0,
                         "cost_ratio": 0.3, "params": 1}
    for f in (copy / "draft").iterdir():
        rel = f"draft/{f.name}"
        manifest["files"][rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    on = Engine.from_bundle(copy, EngineConfig(device="cpu"))
    assert on.drafter is not None and on.drafter.k == 3
    off = Engine.from_bundle(copy, EngineConfig(device="cpu", speculative=False))
    assert off.drafter is None and off.speculation() is None


def test_serving_with_a_draft_per_request_switch_and_metrics(bundle):
    """Over HTTP: the same greedy text with and without speculation, the request-level
    switch validated, and acceptance on /metrics."""
    import httpx

    from dwc.perf.soak import serving

    spec = spec_engine(bundle, bundle / "model", num_blocks=256)
    with serving(spec) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        body = {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0}
        off = c.post("/v1/completions", json={**body, "speculative": False}).json()
        assert spec.speculation()["steps"] == 0
        on = c.post("/v1/completions", json=body).json()
        assert on["choices"][0]["text"] == off["choices"][0]["text"]
        bad = c.post("/v1/completions", json={**body, "speculative": "no"})
        assert bad.status_code == 400 and "speculative" in bad.json()["error"]["message"]
        metrics = c.get("/metrics").text
    rate = [line for line in metrics.splitlines() if line.startswith("dwc_spec_acceptance_rate")]
    assert rate and float(rate[0].split()[-1]) > 0.9  # the target drafting for itself
    assert spec.blocks.num_free == 256


def test_ngram_index_proposes_what_followed_the_longest_recurring_suffix():
    from types import SimpleNamespace

    from dwc.runtime.ngram import NgramIndex

    index = NgramIndex()
    seq = SimpleNamespace(prompt_ids=[5, 6, 7, 8, 9, 1, 2, 6, 7, 8], output_ids=[])
    index.extend(seq)                          # "6 7 8" recurs: 9 1 2 followed it
    assert index.propose(3) == [9, 1, 2]
    seq.output_ids += [9, 4, 4]                # suffix "9 4 4" / "4 4" never seen before
    index.extend(seq)
    assert index.propose(3) == []
    seq.output_ids += [6, 7]                   # the latest "6 7" is followed by 8 9 4
    index.extend(seq)
    assert index.tokens == seq.prompt_ids + seq.output_ids
    assert index.propose(3) == [8, 9, 4]
    assert index.propose(1) == [8]


def test_ngram_speculation_is_lossless_and_pays_on_repetitive_text(bundle):
    """Greedy output identical to plain decoding at batch 1 and 12; on code that quotes
    its prompt the lookup is accepted more often than not; sampled requests keep their
    seeds' reproducibility; every block comes back."""
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = Engine(bundle / "model", EngineConfig(device="cpu"))
    spec = Engine(bundle / "model", EngineConfig(device="cpu", speculative_method="ngram"))
    prompts = MORE_PROMPTS + [PROMPTS[0] * 3]
    want = [o.output_ids for o in plain.generate(prompts, params)]
    assert [o.output_ids for o in spec.generate(prompts, params)] == want
    for prompt, ids in zip(prompts[:3], want):
        assert spec.generate([prompt], params)[0].output_ids == ids
    stats = spec.speculation()
    assert stats["method"] == "ngram" and stats["k"] == 4 and stats["steps"] > 0
    assert stats["mean_accepted_tokens"] > 1.5, stats  # 2.59 measured at 64 tokens
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
    first = spec.generate([prompts[-1]], sampled)[0].output_ids
    assert spec.generate([prompts[-1]], sampled)[0].output_ids == first
    assert spec.blocks.num_free == len(spec.blocks.blocks)


def test_one_hot_drafts_keep_the_target_distribution():
    """An n-gram proposal is a token, not a draw: q is one-hot at it
    (speculative._draft_distributions). The first emitted token still follows p_1,
    whether the proposal is p's likeliest token or an unlikely one."""
    from types import SimpleNamespace

    from dwc.runtime.speculative import _draft_distributions

    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, 6, generator=g) * 1.5, -1).double()
    for proposal in ([int(p[0].argmax()), 2], [int(p[0].argmin()), 0]):
        q = _draft_distributions(SimpleNamespace(draft=proposal, draft_probs=[]), p)
        assert q.shape == (2, 6) and q.sum().item() == 2 and q[0, proposal[0]] == 1
        first, n = Counter(), 20000
        for _ in range(n):
            tokens, _ = accept(p, q, proposal, g)
            first[tokens[0]] += 1
        assert chi_square(first, {x: float(p[0, x]) for x in range(6)}, n) < CHI2_999[5]
