"""The runtime's logprobs (dwc/runtime/logprobs.py) are the same however a step is cut:
chunked prefill, preemption and recompute, prefix sharing, speculative verification."""

from __future__ import annotations

import torch

from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams
from tests.test_runtime import PROMPTS

LONG = [p * 3 for p in PROMPTS] + [PROMPTS[0] * 4, PROMPTS[2] * 2]
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=2)


def run(bundle, draft=None, **config):
    engine = Engine(bundle / "model", EngineConfig(device="cpu", **config),
                    draft_dir=draft, draft_k=3 if draft else 0)
    seqs = [engine.add(p, PARAMS) for p in LONG]
    while engine.has_work():
        engine.step()
    assert engine.blocks.num_free == len(engine.blocks.blocks)
    return engine, seqs


def assert_same(a, b, tol: float = 1e-4) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.output_ids == y.output_ids
        assert len(x.prompt_logprobs) == len(x.prompt_ids) - 1
        assert len(x.logprobs) >= len(x.output_ids)
        for got, want in ((x.prompt_logprobs, y.prompt_logprobs),
                          (x.logprobs[:len(x.output_ids)], y.logprobs[:len(y.output_ids)])):
            lp = torch.tensor([e[0] for e in got]) - torch.tensor([e[0] for e in want])
            assert lp.abs().max() < tol
            assert [[t for t, _ in e[1]] for e in got] == [[t for t, _ in e[1]] for e in want]


def test_chunked_and_preempted_steps_record_the_same_logprobs(bundle):
    _, whole = run(bundle, num_blocks=256, max_num_batched_tokens=4096)
    for s in whole:  # greedy: every generated token is its row's top 1
        assert all(e[1][0][0] == t for e, t in zip(s.logprobs, s.output_ids))
    engine, cut = run(bundle, num_blocks=24, max_num_batched_tokens=40, max_num_seqs=6)
    assert engine.scheduler.preemptions > 0  # recomputed prompts record nothing twice
    assert_same(cut, whole)


def test_prompt_logprobs_skip_the_prefix_cache_but_others_share_it(bundle):
    engine = Engine(bundle / "model", EngineConfig(device="cpu", num_blocks=64))
    first = engine.add(LONG[0], PARAMS)
    engine.step()
    again = engine.add(LONG[0], PARAMS)
    plain = engine.add(LONG[0], SamplingParams(max_tokens=2))
    engine.step()
    assert again.num_cached == 0 and plain.num_cached > 0
    while engine.has_work():
        engine.step()
    assert_same([again], [first])


def test_speculative_verification_records_the_target_logprobs(bundle):
    _, plain = run(bundle, num_blocks=256)
    engine, spec = run(bundle, draft=bundle / "model", num_blocks=256)  # its own draft
    assert engine.speculation()["accepted"] > 0
    assert_same(spec, plain, tol=1e-3)
