"""Short measurements of dwc's engine on the GPU that the cost model predicts from
(issue 9; dwc/costmodel.py `Calibration`).

Two figures, both timed around `Engine.step()` (scheduler, model, sampling: what a served
request waits for), synchronised, median of a few steps:

- a decode step of n sequences at a context of about the SLO's prompt length, for n at
  powers of two up to the concurrency limit (CUDA graphs replay these steps);
- what one prompt of the SLO's length adds to a step when it joins n decoding sequences
  (chunked prefill: the step then runs eagerly, and the decode rows pay for that too).

Between those points the cost model interpolates linearly in n. The run takes seconds:
one prefill of every sequence, and a dozen steps per size.
"""

from __future__ import annotations

import random
import statistics
import time

import torch

from dwc.costmodel import Calibration
from dwc.runtime.engine import Engine
from dwc.runtime.sequence import SamplingParams

STEPS = 8        # decode steps timed per size (median)
PROMPTS = 3      # prompts timed joining each size (median)


def calibrate(engine: Engine, prompt_tokens: int, sizes: list[int], seed: int = 0) -> Calibration:
    """Time decode steps and prompt arrivals at each number of sequences in `sizes`."""
    rng = random.Random(seed)
    vocab = len(engine.tokenizer)
    new_prompt = lambda: [rng.randrange(vocab) for _ in range(prompt_tokens)]  # noqa: E731
    params = SamplingParams(max_tokens=output_tokens(len(sizes)), ignore_eos=True)
    decode, prefill = [], []
    live = []
    try:
        for n in sorted(sizes):
            while len(live) < n:
                live.append(engine.add(new_prompt(), params))
            _run_prefills(engine, live)
            decode.append((n, _median_step(engine, STEPS)))
            if n >= engine.scheduler.max_num_seqs:
                continue  # a prompt cannot join a full batch; the model extrapolates
            joined = []
            for _ in range(PROMPTS):
                joined.append(engine.add(new_prompt(), params))
                t = _timed_step(engine)
                prefill.append((n, t - decode[-1][1]))
            for seq in joined:
                engine.abort(seq)
    finally:
        for seq in live:
            engine.abort(seq)
    extra = [(n, statistics.median(t for m, t in prefill if m == n))
             for n in sorted({m for m, _ in prefill})]
    return Calibration(context=prompt_tokens, prompt_tokens=prompt_tokens, decode=decode,
                       prefill=extra, device=torch.cuda.get_device_name(0))


def output_tokens(num_sizes: int) -> int:
    """What a calibration sequence may generate: enough never to finish while timing."""
    return (STEPS + PROMPTS + 2) * (num_sizes + 1) + 8


def _run_prefills(engine: Engine, live: list) -> None:
    """Step until every live sequence has its prompt in the cache."""
    while any(seq.is_prefill for seq in live):
        engine.step()
    torch.cuda.synchronize()


def _timed_step(engine: Engine) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _median_step(engine: Engine, steps: int) -> float:
    _timed_step(engine)  # the first step at a new size may capture nothing, but warms up
    return statistics.median(_timed_step(engine) for _ in range(steps))
