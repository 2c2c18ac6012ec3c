"""Short measurements of dwc's engine on the GPU that the cost model predicts from
(issue 9; dwc/perf/costmodel.py `Calibration`).

Two measurements, both timed around `Engine.step()` (scheduler, model, sampling: what a
served request waits for), synchronised:

1. Decode steps of n sequences at a context of about the SLO's prompt length (median of
   a few), for n at powers of two up to the concurrency limit; CUDA graphs replay these.
2. What prompts cost. A step with prompts runs eagerly, so the first prompt in a step
   also pays the launch overhead of every row; prompts arriving together share it. A step
   of k prompts lasts decode(n) + first + (k - 1) * each. `each` comes from MANY_PROMPTS
   prompts joining one step, timed alone (scheduler limits lifted for that step).
   `first` comes from a short serving run at a moderate Poisson rate (dwc bench's online
   loop) with every step logged: the mean extra of its steps with one prompt, because
   steps timed alone cost more than the same steps while serving (measured on the H200).
   The spread of the logged prompt steps around first + (k - 1) * each (quantiles of
   their ratio) goes to the load simulation, whose p99s depend on it.

About 12 s for the example model on the H200 (the whole `tune` pass, confirmation
included); not timed separately for larger models.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import TYPE_CHECKING

import torch

from dwc.perf.bench import BenchConfig, online, sync
from dwc.perf.costmodel import Calibration, interpolate
from dwc.runtime.engine import Engine
from dwc.runtime.sequence import SamplingParams

if TYPE_CHECKING:
    from dwc.runtime.model_runner import ModelRunner

STEPS = 8            # decode steps timed per size (median)
SERVING_REQUESTS = 150
SERVING_WARMUP = 30
PROMPT_SHARE = 0.3   # the serving run's rate: prompts take about this share of the time
SPREAD_QUANTILES = 20
MANY_PROMPTS = 8     # prompts joining one step, to time what each further one adds


def calibrate(engine: Engine, prompt_tokens: int, output_tokens: int, sizes: list[int],
              seed: int = 0) -> Calibration:
    """Decode steps at each number of sequences in `sizes`, then a short serving run.

    Steps run synchronously here: an overlapped step's wall time is mostly the wait for
    the step before it (docs/RUNTIME.md), so a step log would charge each prompt to the
    step after its own. Synchronous costs are an upper bound of the overlapped ones (by
    the host's time per step)."""
    overlap = engine.set_overlap(False)
    try:
        return _calibrate(engine, prompt_tokens, output_tokens, sizes, seed)
    finally:
        engine.set_overlap(overlap)


def _calibrate(engine: Engine, prompt_tokens: int, output_tokens: int, sizes: list[int],
               seed: int) -> Calibration:
    decode, alone, each = _decode_steps(engine, prompt_tokens, sizes, seed)
    log = StepLog(engine)
    try:
        rate = PROMPT_SHARE / max(alone, 1e-4)
        online(engine, BenchConfig(input_len=prompt_tokens, output_len=output_tokens, rps=rate,
                                   online_requests=SERVING_REQUESTS,
                                   online_warmup=SERVING_WARMUP, seed=seed), on_step=log)
    finally:
        log.detach()
    first, spread = fit_prompt_costs(log.rows, decode, each)
    device = torch.cuda.get_device_name(0) if engine.runner.device == "cuda" else "cpu"
    return Calibration(context=prompt_tokens, prompt_tokens=prompt_tokens, decode=decode,
                       prefill=[(1, first)], prefill_each=each, prefill_spread=spread,
                       device=device)


def fit_prompt_costs(rows: list, decode: list, each: float) -> tuple[float, list]:
    """From logged steps (seconds, sequences, prompts): `first`, the mean extra of steps
    with one prompt, and the quantiles of every prompt step's extra / (first + each * (k -
    1)). `each` comes from a step of many prompts timed alone: a serving run at a moderate
    rate has too few steps with several prompts to tell it."""
    points = [(k - 1, seconds - interpolate(decode, max(n - k, 1)))
              for seconds, n, k in rows if k > 0]
    single = [y for x, y in points if x == 0]
    if not single:
        raise ValueError("the serving run logged no step with one prompt")
    first = max(statistics.mean(single), 1e-6)
    ratios = sorted(y / (first + each * x) for x, y in points)
    q = SPREAD_QUANTILES
    spread = [ratios[min(len(ratios) - 1, int((i + 0.5) / q * len(ratios)))] for i in range(q)]
    return first, [round(r, 4) for r in spread]


class StepLog:
    """Each step's (seconds, sequences, prompts): `online`'s on_step hook, with the
    scheduler's chunks seen on their way out (prompts: chunks longer than one token)."""

    def __init__(self, engine: Engine):
        self.rows: list[tuple[float, int, int]] = []
        self._engine = engine
        self._last = (0, 0)
        engine.schedule_hooks.append(self._seen)

    def _seen(self, chunks) -> None:
        self._last = (len(chunks), sum(1 for c in chunks if c.length > 1))

    def __call__(self, seconds: float) -> None:
        self.rows.append((seconds, *self._last))

    def detach(self) -> None:
        self._engine.schedule_hooks.remove(self._seen)


def _decode_steps(engine: Engine, prompt_tokens: int, sizes: list[int], seed: int):
    """[(n, seconds of a decode step)] for n in sizes; at the first size, one prompt's
    extra (the serving run's rate is picked from it) and what each further prompt of
    MANY_PROMPTS joining one step adds, timed alone."""
    rng = random.Random(seed)
    vocab = len(engine.tokenizer)
    params = SamplingParams(max_tokens=calibration_tokens(len(sizes)), ignore_eos=True)

    def new():
        return engine.add([rng.randrange(vocab) for _ in range(prompt_tokens)], params)

    def join(count: int) -> float:
        """A step that `count` prompts join, all of them whole: the scheduler's limits are
        lifted for it (the plan's token budget may hold fewer prompts)."""
        running = len(engine.scheduler.running)
        seqs_cap, tokens_cap = engine.set_limits()  # the current limits
        limits = engine.set_limits(max(seqs_cap, running + count),
                                   max(tokens_cap, running + count * prompt_tokens))
        seqs = [new() for _ in range(count)]
        try:
            t = _timed_step(engine)
        finally:
            engine.set_limits(*limits)
            for seq in seqs:
                engine.abort(seq)
        return t

    decode, alone, each, live = [], None, None, []
    try:
        for n in sorted(sizes):
            # n decoding sequences: top up, prefill; sequences that finished meanwhile
            # (long prefills at large n) are replaced
            while len(live) < n or any(seq.is_prefill for seq in live):
                live = [seq for seq in live if seq.finish_reason is None]
                live += [new() for _ in range(n - len(live))]
                while any(seq.is_prefill for seq in live):
                    engine.step()
            decode.append((n, _median_step(engine, STEPS)))
            if alone is None:
                join(MANY_PROMPTS)  # warm-up: these shapes
                alone = statistics.median(join(1) for _ in range(3)) - decode[-1][1]
                many = statistics.median(join(MANY_PROMPTS) for _ in range(3)) - decode[-1][1]
                each = max((many - alone) / (MANY_PROMPTS - 1), 0.0)
    finally:
        for seq in live:
            engine.abort(seq)
    return decode, alone, each


def calibration_tokens(num_sizes: int) -> int:
    """What a decode-step sequence may generate: enough never to finish while timing."""
    return (STEPS + 4) * (num_sizes + 1)


def _timed_step(engine: Engine) -> float:
    sync(engine)
    t0 = time.perf_counter()
    engine.step()
    sync(engine)
    return time.perf_counter() - t0


def _median_step(engine: Engine, steps: int) -> float:
    _timed_step(engine)  # the first step at a new size warms up
    return statistics.median(_timed_step(engine) for _ in range(steps))


def decode_step_seconds(runner: "ModelRunner", context: int = 128, steps: int = 32) -> float:
    """Seconds of one batch-1 decode step after `context` tokens (median of `steps`),
    synchronised: what a draft's cost ratio is measured with."""
    from dwc.runtime.block_manager import BlockManager
    from dwc.runtime.scheduler import Chunk
    from dwc.runtime.sequence import Sequence

    blocks = BlockManager(-(-(context + steps + 4) // runner.block_size), runner.block_size)
    seq = Sequence([1 + i % 100 for i in range(context + steps + 4)], SamplingParams())
    blocks.grow(seq, seq.num_tokens)
    runner.run([Chunk(seq, 0, context, logits=1)], blocks)
    times = []
    wait = torch.cuda.synchronize if runner.device == "cuda" else (lambda: None)
    for pos in range(context, context + steps + 4):
        wait()
        t0 = time.perf_counter()
        runner.run([Chunk(seq, pos, 1, logits=1)], blocks)
        wait()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[4:])  # the first steps warm up
