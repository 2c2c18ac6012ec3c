"""Short measurements of dwc's engine on the GPU that the cost model predicts from
(issue 9; dwc/costmodel.py `Calibration`).

Timed around `Engine.step()` (scheduler, model, sampling: what a served request waits
for), synchronised:

- a decode step of n sequences at a context of about the SLO's prompt length (median of
  a few), for n at powers of two up to the concurrency limit (CUDA graphs replay these);
- what one prompt of the SLO's length adds to a step when it joins n decoding sequences,
  and what each further prompt in the same step adds (chunked prefill: a step with a
  prompt runs eagerly, so the first prompt also pays the decode rows' launch overhead;
  prompts arriving together share it). These vary from step to step by tens of percent,
  so the prompt's cost is a least-squares line in n through every timing (the model
  deals in means), not one figure per size.

Between measured sizes the cost model interpolates linearly in n. The run takes seconds.
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
PROMPTS = 3      # the most prompts joining one step
REPEATS = 6      # timings of one prompt joining, per size


def calibrate(engine: Engine, prompt_tokens: int, sizes: list[int], seed: int = 0) -> Calibration:
    """Time decode steps and prompt arrivals at each number of sequences in `sizes`."""
    rng = random.Random(seed)
    vocab = len(engine.tokenizer)
    params = SamplingParams(max_tokens=output_tokens(len(sizes)), ignore_eos=True)

    def join(count: int) -> float:
        """Seconds of a step that `count` new prompts join; they leave after it."""
        seqs = [engine.add([rng.randrange(vocab) for _ in range(prompt_tokens)], params)
                for _ in range(count)]
        t = _timed_step(engine)
        for seq in seqs:
            engine.abort(seq)
        return t

    decode, one, each = [], [], []
    live = []
    try:
        for n in sorted(sizes):
            while len(live) < n:
                live.append(engine.add([rng.randrange(vocab) for _ in range(prompt_tokens)],
                                       params))
            _run_prefills(engine, live)
            step = _median_step(engine, STEPS)
            decode.append((n, step))
            if n + PROMPTS > engine.scheduler.max_num_seqs:
                continue  # prompts cannot join a full batch; the model extrapolates
            join(1)  # warm-up: this step's shapes
            timed = [(n, join(1) - step) for _ in range(REPEATS)]
            one.extend(timed)
            alone = statistics.mean(t for _, t in timed)
            each.append((join(PROMPTS) - step - alone) / (PROMPTS - 1))
    finally:
        for seq in live:
            engine.abort(seq)
    each_s = max(statistics.median(each), 0.0) if each else None
    device = torch.cuda.get_device_name(0) if _cuda(engine) else "cpu"
    return Calibration(context=prompt_tokens, prompt_tokens=prompt_tokens, decode=decode,
                       prefill=_line(one), prefill_each=each_s, device=device)


def output_tokens(num_sizes: int) -> int:
    """What a calibration sequence may generate: enough never to finish while timing."""
    return (STEPS + PROMPTS + 2) * (num_sizes + 1) + 8


def _line(points: list) -> list:
    """The least-squares line through (n, seconds) points, as its two end points."""
    if not points:
        return []
    xs = [x for x, _ in points]
    mx, my = statistics.mean(xs), statistics.mean(y for _, y in points)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    lo, hi = min(xs), max(xs)
    return [(lo, my + slope * (lo - mx))] + ([(hi, my + slope * (hi - mx))] if hi > lo else [])


def _run_prefills(engine: Engine, live: list) -> None:
    """Step until every live sequence has its prompt in the cache."""
    while any(seq.is_prefill for seq in live):
        engine.step()


def _cuda(engine: Engine) -> bool:
    return engine.runner.device == "cuda"


def _timed_step(engine: Engine) -> float:
    sync = torch.cuda.synchronize if _cuda(engine) else (lambda: None)
    sync()
    t0 = time.perf_counter()
    engine.step()
    sync()
    return time.perf_counter() - t0


def _median_step(engine: Engine, steps: int) -> float:
    _timed_step(engine)  # the first step at a new size may capture nothing, but warms up
    return statistics.median(_timed_step(engine) for _ in range(steps))
