"""A roofline cost model of dwc's runtime on a target: predicted time per output token,
time to first token and sustainable request rate, the replicas a request rate needs, and
dollars per million tokens (issue 9).

A decode step of n sequences at mean context c reads the weights once and every
sequence's K/V, and does 2 FLOPs per parameter per token:

    step(n, c) = s0 + s1 * n + max(bytes(n, c) / (eta_bw * BW), 2 * P * n / (eta_f * F))

BW and F are the target's bandwidth and peak FLOP/s (its YAML); eta_bw and eta_f the
fraction dwc's kernels reach, s0 and s1 the host time per step and per sequence. The
defaults were measured on the H200 with dwc's runtime (benchmarks/results/
h200-2026-11-24-perf-b6b09c6.json, 8B shape, FP8): batch 1 step 4.1 ms with 3.4 ms on the
GPU against 1.8 ms of weight reads at full bandwidth (eta_bw 0.54), batch 128 step 8.5 ms
with 5.3 ms on the GPU (host 0.75 ms + 25 us per sequence). With a draft, a step yields tau
tokens per sequence and costs (1 + K c) steps.

Load: requests of P prompt and O output tokens arriving at rate r. By Little's law the
number in the system is n = r (TTFT + O * TPOT); a prefill of P tokens takes
prefill(P) = s0 + max(weights / (eta_bw BW), 2 P params / (eta_f F)) and shares steps
with decoding (chunked prefill), so per second the GPU spends r * prefill(P) on prompts and
the rest on decode steps. The model iterates n to a fixed point; it has none (the queue
grows) when prompts and decode steps need more than the whole second. p99 figures are
the mean times P99_FACTOR (arrivals are Poisson; a step's length varies with the batch's
prefill share): measured against dwc bench, see benchmarks/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

P99_FACTOR = 1.25


@dataclass
class Machine:
    bandwidth: float          # bytes/s
    peak_flops: float         # FLOP/s
    usd_per_hour: float
    eta_bw: float = 0.54      # fraction of bandwidth reached (measured, see above)
    eta_f: float = 0.35       # fraction of peak FLOP/s reached at large batches
    s0: float = 0.75e-3       # host seconds per step
    s1: float = 25e-6         # host seconds per sequence per step


@dataclass
class ModelFigures:
    weight_bytes: float
    params: float
    kv_bytes_per_token: float
    tau: float = 1.0          # tokens per decode step per sequence (draft: measured)
    step_cost: float = 1.0    # a decode step's cost relative to the target's alone (1 + K c)


def step_seconds(m: Machine, f: ModelFigures, n: float, context: float) -> float:
    bytes_ = f.weight_bytes + n * context * f.kv_bytes_per_token
    flops = 2 * f.params * n
    return m.s0 + m.s1 * n + max(bytes_ / (m.eta_bw * m.bandwidth), flops / (m.eta_f * m.peak_flops))


def prefill_seconds(m: Machine, f: ModelFigures, tokens: int) -> float:
    return m.s0 + max(f.weight_bytes / (m.eta_bw * m.bandwidth),
                      2 * f.params * tokens / (m.eta_f * m.peak_flops))


@dataclass
class Prediction:
    rps: float
    concurrency: float        # sequences in the system (Little's law)
    tpot_ms: float            # mean
    ttft_ms: float            # mean
    output_tok_s: float
    stable: bool

    @property
    def tpot_p99_ms(self) -> float:
        return self.tpot_ms * P99_FACTOR

    @property
    def ttft_p99_ms(self) -> float:
        return self.ttft_ms * P99_FACTOR

    def as_dict(self) -> dict:
        return {"rps": round(self.rps, 3), "concurrency": round(self.concurrency, 2),
                "tpot_ms": round(self.tpot_ms, 3), "tpot_p99_ms": round(self.tpot_p99_ms, 3),
                "ttft_ms": round(self.ttft_ms, 3), "ttft_p99_ms": round(self.ttft_p99_ms, 3),
                "output_tok_s": round(self.output_tok_s, 1), "stable": self.stable}


def predict(m: Machine, f: ModelFigures, rps: float, prompt: int, output: int,
            max_seqs: int) -> Prediction:
    """Steady state at `rps` requests/s (mean figures; see the module docstring)."""
    prefill = prefill_seconds(m, f, prompt)
    decode_share = 1 - rps * prefill        # of each second, what decode steps get
    n = 1.0
    for _ in range(200):
        context = prompt + output / 2
        step = step_seconds(m, f, n, context) * f.step_cost
        tpot = step / f.tau / max(decode_share, 1e-9)
        ttft = prefill + step
        new_n = min(max_seqs, max(1.0, rps * (ttft + output * tpot)))
        if abs(new_n - n) < 1e-6:
            break
        n = new_n
    stable = decode_share > 0 and rps * (ttft + output * tpot) <= max_seqs + 1e-6
    return Prediction(rps, n, tpot * 1000, ttft * 1000, rps * output, stable)


def max_rps(m: Machine, f: ModelFigures, prompt: int, output: int, max_seqs: int,
            tpot_ms: float | None = None, ttft_ms: float | None = None) -> Prediction:
    """The highest stable rate whose p99 figures meet the given limits (bisection)."""
    def ok(r: float) -> bool:
        p = predict(m, f, r, prompt, output, max_seqs)
        return p.stable and (tpot_ms is None or p.tpot_p99_ms <= tpot_ms) and \
            (ttft_ms is None or p.ttft_p99_ms <= ttft_ms)

    lo, hi = 0.0, 1.0
    while ok(hi) and hi < 1e7:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return predict(m, f, lo, prompt, output, max_seqs)


def replicas(target_rps: float, one: float) -> int | None:
    """Devices needed for `target_rps` when one sustains `one` (None: not even at 0 rps)."""
    return math.ceil(target_rps / one) if one > 0 else None


def usd_per_million_tokens(usd_per_hour: float, output_tok_s: float) -> float | None:
    return usd_per_hour / 3600 / output_tok_s * 1e6 if output_tok_s > 0 else None
