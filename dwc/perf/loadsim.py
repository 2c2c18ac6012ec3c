"""p99 latency by simulating dwc's scheduler under Poisson arrivals, with the cost
model's step costs (issue 9).

The cost model's closed forms give means well; p99s depend on bursts: a burst of
arrivals makes a run of long steps with prompts, which lengthens every running request,
which lets more arrivals land in its lifetime. The simulation plays that out step by
step, as the scheduler does it (FCFS, waiting prompts join the next step up to the
concurrency limit; a step costs decode(n) plus, with prompts, the first prompt's cost and
each further one's, times a factor drawn from the spread calibration measured; a prompt
step on an idle engine costs decode(1) plus that when calibrated, as calibration measured
it net of one decode row, and the prompt's cost alone for the roofline), for a
few thousand requests from a fixed seed (builds stay reproducible), and reads p99 TTFT
and TPOT off the requests after a warm-up.

It is slower than the closed forms (a fraction of a second), so `tune` searches the
rate with those and then checks and backs off the chosen rate with this.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass

from dwc.perf.costmodel import Machine, ModelFigures, Prediction, predict, prompt_seconds, \
    step_seconds

REQUESTS = 3000
WARMUP = 300
BACKOFF = 0.95          # each retry lowers the rate by 5%
MAX_BACKOFFS = 40


@dataclass
class Simulated:
    rps: float
    ttft_ms: float        # mean
    tpot_ms: float        # mean
    ttft_p99_ms: float
    tpot_p99_ms: float

    def as_dict(self) -> dict:
        return {k: round(v, 3) for k, v in vars(self).items()}


def simulate(m: Machine, f: ModelFigures, rps: float, prompt: int, output: int,
             max_seqs: int, requests: int = REQUESTS, seed: int = 0) -> Simulated:
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(requests + WARMUP):
        t += rng.expovariate(rps)
        arrivals.append(t)
    context = prompt + output / 2
    decode = [step_seconds(m, f, max(n, 1), context) * f.step_cost for n in range(max_seqs + 1)]
    costs = [prompt_seconds(m, f, prompt, max(n, 1)) for n in range(max_seqs + 1)]
    # Prompt steps vary around their mean cost: drawn from the calibration's spread.
    spread = (m.calibration.prefill_spread if m.calibration else None) or [1.0]
    steps_after_first = math.ceil(max(output - 1, 0) / f.tau)  # decode steps per request
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    waiting: deque[int] = deque()
    finishing: list[tuple[int, int]] = []  # (step index it finishes at, request)
    now, step, nxt = 0.0, 0, 0
    while len(done) < len(arrivals):
        while nxt < len(arrivals) and arrivals[nxt] <= now:
            waiting.append(nxt)
            nxt += 1
        running = len(finishing)
        if not running and not waiting:
            now = arrivals[nxt]
            continue
        joining = []
        while waiting and running + len(joining) < max_seqs:
            joining.append(waiting.popleft())
        duration = decode[running] if running or m.calibration else 0.0
        if joining:
            one, each = costs[running]
            duration += (one + (len(joining) - 1) * each) * rng.choice(spread)
        now += duration
        step += 1
        for r in joining:
            first[r] = now
            if steps_after_first:
                heapq.heappush(finishing, (step + steps_after_first, r))
            else:
                done[r] = now
        while finishing and finishing[0][0] <= step:
            done[heapq.heappop(finishing)[1]] = now
    measured = range(WARMUP, len(arrivals))
    ttft = sorted(first[r] - arrivals[r] for r in measured)
    tpot = sorted((done[r] - first[r]) / max(output - 1, 1) for r in measured)
    p99 = lambda xs: 1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))]  # noqa: E731
    mean = lambda xs: 1000 * sum(xs) / len(xs)  # noqa: E731
    return Simulated(rps, mean(ttft), mean(tpot), p99(ttft), p99(tpot))


def check_rate(m: Machine, f: ModelFigures, rate: float, prompt: int, output: int,
               max_seqs: int, tpot_ms: float | None, ttft_ms: float | None
               ) -> tuple[Prediction, Simulated, bool]:
    """The highest rate at or below `rate` (5% steps, at most MAX_BACKOFFS) whose
    simulated p99s meet the limits: its closed-form prediction (means, stability), its
    simulation, and True; or, when none does, the last rate tried, its simulation and
    False."""
    for _ in range(MAX_BACKOFFS):
        sim = simulate(m, f, rate, prompt, output, max_seqs)
        if (tpot_ms is None or sim.tpot_p99_ms <= tpot_ms) and \
                (ttft_ms is None or sim.ttft_p99_ms <= ttft_ms):
            return predict(m, f, rate, prompt, output, max_seqs), sim, True
        last = rate
        rate *= BACKOFF
    return predict(m, f, last, prompt, output, max_seqs), sim, False
