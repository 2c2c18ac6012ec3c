"""Asynchronous scheduling (dwc/runtime/inflight.py) changes when the host learns a
token, never which token: every workload here gives the same tokens and finish reasons
with it on and off, and leaves every KV block free."""

from __future__ import annotations

import pytest

from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams

PROMPTS = ["import os\nimport sys\n\ndef main():\n",
           "class Foo(object):\n    def __init__(self",
           "# Copyright 2001 Python Software Foundation\n" * 3,
           "def _check(value):\n    if not isinstance(value, int):\n        raise",
           "for i in range(10):\n    print(",
           "return self._"]


def engine(bundle, overlap: bool, **kw) -> Engine:
    return Engine.from_bundle(bundle, EngineConfig(device="cpu", async_scheduling=overlap,
                                                   **kw))


def run(eng: Engine, params: list[SamplingParams]) -> list[tuple]:
    outs = eng.generate(PROMPTS, params)
    assert eng.inflight is None and not eng.has_work()
    assert eng.blocks.num_free == len(eng.blocks.blocks), "a KV block leaked"
    assert all(b.ref_count == 0 for b in eng.blocks.blocks)
    return [(o.output_ids, o.finish_reason, o.text) for o in outs]


def mixed_params() -> list[SamplingParams]:
    """EOS allowed (finishes at different steps), stop strings, short and long limits."""
    return [SamplingParams(max_tokens=40), SamplingParams(max_tokens=1),
            SamplingParams(max_tokens=30, stop=["\n"]), SamplingParams(max_tokens=25),
            SamplingParams(max_tokens=7, ignore_eos=True), SamplingParams(max_tokens=33,
                                                                          stop=["("])]


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=24),
                                dict(num_blocks=10, block_size=8), dict(max_num_seqs=2)],
                         ids=["roomy", "chunked-prefill", "preempting", "queueing"])
def test_same_tokens_with_and_without_overlap(bundle, kw):
    params = mixed_params()
    want = run(engine(bundle, False, **kw), params)
    assert run(engine(bundle, True, **kw), params) == want


def test_steps_overlap_and_tokens_arrive_one_step_later(bundle):
    """The path is really taken: after a greedy step is launched the engine holds it in
    flight, its sequences' newest token pending, not yet in output_ids."""
    eng = engine(bundle, True)
    seq = eng.add(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True))
    eng.step()
    assert eng.inflight is not None and seq.num_pending == 1 and seq.output_ids == []
    eng.step()
    assert len(seq.output_ids) == 1 and seq.num_pending == 1
    while eng.has_work():
        eng.step()
    assert len(seq.output_ids) == 5 and seq.num_pending == 0


@pytest.mark.parametrize("kw", [dict(), dict(num_blocks=10, block_size=8)],
                         ids=["roomy", "preempting"])
def test_sampled_requests_overlap_and_stay_reproducible(bundle, kw):
    """Seeded sampled requests (top-k / top-p too) beside greedy ones: their steps
    overlap (drawn on the device), and give the tokens they give without overlap."""
    params = [SamplingParams(max_tokens=20, temperature=0.8, seed=i, top_k=40 * (i % 3),
                             top_p=0.9 if i % 4 == 1 else 1.0) if i % 2 else
              SamplingParams(max_tokens=20) for i in range(len(PROMPTS))]
    overlapped = engine(bundle, True, **kw)
    seq = overlapped.add(PROMPTS[0], params[1])
    overlapped.step()
    assert overlapped.inflight is not None  # launched, not collected: it overlaps
    overlapped.abort(seq)
    while overlapped.has_work():
        overlapped.step()
    assert run(overlapped, params) == run(engine(bundle, False, **kw), params)


def test_abort_while_a_token_is_in_flight(bundle):
    eng = engine(bundle, True)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    a, b = eng.add(PROMPTS[0], params), eng.add(PROMPTS[1], params)
    eng.step()
    eng.step()
    eng.abort(a)  # its token from the step in flight is dropped when it arrives
    while eng.has_work():
        eng.step()
    alone = engine(bundle, False).generate([PROMPTS[1]], params)[0].output_ids
    assert a.finish_reason == "abort" and b.output_ids == alone
    assert eng.blocks.num_free == len(eng.blocks.blocks)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(num_blocks=256), dict(num_blocks=12, block_size=8),
                                dict(num_blocks=256, max_num_batched_tokens=24)],
                         ids=["roomy", "preempting", "chunked-prefill"])
def test_same_tokens_with_and_without_overlap_on_the_gpu(bundle, kw):
    """The GPU path: pending ids fed into captured graphs and eager mixed steps from the
    device, pinned copies, events."""
    params = mixed_params()
    runs = [Engine.from_bundle(bundle, EngineConfig(device="cuda", dtype="float32",
                                                    async_scheduling=overlap, **kw))
            for overlap in (False, True)]
    assert run(runs[1], params) == run(runs[0], params)


@pytest.mark.gpu
def test_seeded_sampling_overlaps_with_the_same_tokens_on_the_gpu(bundle):
    """The device sampler on the GPU: per-request CUDA generators, top-k / top-p sorts,
    the draws fed into the next captured step."""
    params = [SamplingParams(max_tokens=24, temperature=0.9, seed=i, top_k=20 * (i % 3),
                             top_p=0.85 if i % 2 else 1.0) for i in range(len(PROMPTS))]
    runs = [Engine.from_bundle(bundle, EngineConfig(device="cuda", dtype="float32",
                                                    async_scheduling=overlap))
            for overlap in (False, True)]
    assert run(runs[1], params) == run(runs[0], params)


def test_a_pending_token_never_reaches_the_model_unfed(bundle):
    """Driving the runner by hand after an overlapped step (the token still pending) is
    refused in Python, not turned into an out-of-range embedding index."""
    from dwc.runtime.scheduler import Chunk

    eng = engine(bundle, True)
    seq = eng.add(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    eng.blocks.grow(seq, seq.num_tokens)
    with pytest.raises(RuntimeError, match="pending token"):
        eng.runner.run([Chunk(seq, seq.num_computed, 1, logits=1)], eng.blocks)
