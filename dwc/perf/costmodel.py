"""A cost model of dwc's runtime on a target: predicted time per output token, time to
first token and sustainable request rate, the replicas a request rate needs, and dollars
per million tokens (issue 9).

Two step costs drive it:

- decode(n, c): a decode step of n sequences at mean context c. Calibrated (measured by
  dwc's engine on the target's GPU, dwc/perf/calibration.py): interpolated between measured
  sizes, plus the K/V bytes of the context beyond the measured one. Otherwise a roofline:
  the step reads the weights once and every sequence's K/V, and does 2 FLOPs per
  parameter per token,

      decode(n, c) = s0 + s1 * n + max(bytes(n, c) / (eta_bw * BW), 2 * P * n / (eta_f * F))

  BW and F are the target's bandwidth and peak FLOP/s (its YAML); eta_bw, eta_f, s0, s1
  defaults measured on the H200 (benchmarks/results/h200-2026-11-24-perf-b6b09c6.json).
- extra(n): what one prompt of the SLO's length adds to a step of n decoding sequences
  (chunked prefill: prompts join decode steps). Calibrated, or the roofline's prefill.

Load: requests of P prompt and O output tokens arrive as a Poisson process at rate r.
Prompts take r * extra of each second; decode steps share the rest, so the mean time per
output token is decode / tau / (1 - r * extra) (tau: tokens per step with a draft). By
Little's law n = r (TTFT + O * TPOT); the model iterates n to a fixed point, and there
is none (the queue grows) when prompts need the whole second or n passes the concurrency
limit.

The p99 figures come from the same arrivals: a request's TPOT is its O - 1 decode steps
plus the prompts that joined them, a Poisson count whose 99th percentile k gives
(steps * decode + k * extra) / (O - 1); its TTFT is the rest of the step in progress when
it arrived and its own prefill step, each carrying the 99th percentile of the prompts that
arrive within a step. Measured against dwc bench on the H200: benchmarks/costmodel_gpu.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

COMPUTE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}  # per weight, unquantized

QUANTILE = 0.99


@dataclass
class Calibration:
    """Step times measured by dwc's engine on the target's GPU (dwc/perf/calibration.py)."""

    context: int                                           # context the decode steps had
    prompt_tokens: int                                     # length of the prompts timed
    decode: list = field(default_factory=list)             # [(sequences, seconds)]
    prefill: list = field(default_factory=list)            # [(sequences, one prompt's extra)]
    prefill_each: float | None = None                      # each further prompt in a step
    prefill_spread: list = field(default_factory=list)     # quantiles of step / fitted cost
    device: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(d["context"], d["prompt_tokens"], [tuple(x) for x in d["decode"]],
                   [tuple(x) for x in d["prefill"]], d.get("prefill_each"),
                   d.get("prefill_spread", []), d.get("device", ""))


@dataclass
class Machine:
    bandwidth: float          # bytes/s
    peak_flops: float         # FLOP/s
    usd_per_hour: float
    eta_bw: float = 0.54      # fraction of bandwidth reached (measured, see above)
    eta_f: float = 0.35       # fraction of peak FLOP/s reached at large batches
    s0: float = 0.75e-3       # host seconds per step
    s1: float = 25e-6         # host seconds per sequence per step
    calibration: Calibration | None = None


@dataclass
class ModelFigures:
    weight_bytes: float
    params: float
    kv_bytes_per_token: float
    tau: float = 1.0          # tokens per decode step per sequence (draft: measured)
    step_cost: float = 1.0    # a decode step's cost relative to the target's alone (1 + K c)


def interpolate(points: list, x: float) -> float:
    """Linear through (x, y) points sorted by x; the end segments extend beyond them."""
    if len(points) == 1:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1 or (x1, y1) == points[-1]:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable")


def step_seconds(m: Machine, f: ModelFigures, n: float, context: float) -> float:
    """A decode step of n sequences at mean context `context`."""
    cal = m.calibration
    if cal:
        more_kv = n * (context - cal.context) * f.kv_bytes_per_token
        return interpolate(cal.decode, n) + more_kv / (m.eta_bw * m.bandwidth)
    bytes_ = f.weight_bytes + n * context * f.kv_bytes_per_token
    flops = 2 * f.params * n
    return m.s0 + m.s1 * n + max(bytes_ / (m.eta_bw * m.bandwidth),
                                 flops / (m.eta_f * m.peak_flops))


def prompt_seconds(m: Machine, f: ModelFigures, tokens: int, n: float = 1) -> tuple:
    """(first, each): what the first prompt of `tokens` adds to a step of n decoding
    sequences, and what each further prompt in the same step adds."""
    cal = m.calibration
    if cal and cal.prefill:
        first = interpolate(cal.prefill, n) * tokens / cal.prompt_tokens
        each = first if cal.prefill_each is None else cal.prefill_each * tokens / cal.prompt_tokens
        return first, each
    compute = 2 * f.params * tokens / (m.eta_f * m.peak_flops)
    return m.s0 + max(f.weight_bytes / (m.eta_bw * m.bandwidth), compute), compute


def prefill_seconds(m: Machine, f: ModelFigures, tokens: int, n: float = 1) -> float:
    """What one prompt of `tokens` adds to a step of n decoding sequences."""
    return prompt_seconds(m, f, tokens, n)[0]


def poisson_quantile(q: float, mean: float) -> int:
    """The smallest k with P(X <= k) >= q for X ~ Poisson(mean), 0 < q < 1."""
    if not 0 < q < 1 or math.isnan(mean) or math.isinf(mean):
        raise ValueError(f"poisson_quantile({q}, {mean})")
    if mean <= 0:
        return 0
    if mean > 500:  # normal approximation; the sum below underflows
        return math.ceil(mean + NormalDist().inv_cdf(q) * math.sqrt(mean))
    k, term = 0, math.exp(-mean)
    total = term
    while total < q:
        k += 1
        term *= mean / k
        total += term
    return k


@dataclass
class Prediction:
    rps: float
    concurrency: float        # sequences in the system (Little's law)
    tpot_ms: float            # mean
    ttft_ms: float            # mean
    tpot_p99_ms: float
    ttft_p99_ms: float
    output_tok_s: float
    stable: bool

    def as_dict(self) -> dict:
        return {"rps": round(self.rps, 3), "concurrency": round(self.concurrency, 2),
                "tpot_ms": round(self.tpot_ms, 3), "tpot_p99_ms": round(self.tpot_p99_ms, 3),
                "ttft_ms": round(self.ttft_ms, 3), "ttft_p99_ms": round(self.ttft_p99_ms, 3),
                "output_tok_s": round(self.output_tok_s, 1), "stable": self.stable}


def predict(m: Machine, f: ModelFigures, rps: float, prompt: int, output: int,
            max_seqs: int) -> Prediction:
    """Steady state at `rps` requests/s (see the module docstring)."""
    n = 1.0
    for _ in range(200):
        decode = step_seconds(m, f, n, prompt + output / 2) * f.step_cost
        first, each = prompt_seconds(m, f, prompt, n)
        fixed = first - each                # paid once by a step with any prompt
        step, stable = _mean_step(rps, decode, fixed, each)
        if not stable:  # the queue of prompts grows without bound
            return Prediction(rps, max_seqs, math.inf, math.inf, math.inf, math.inf, 0.0, False)
        per_step = rps * step               # prompts arriving per step (mean)
        mixed = 1 - math.exp(-per_step)     # share of steps with a prompt
        long = decode + fixed + each * per_step / max(mixed, 1e-12)  # such a step
        residual = ((1 - mixed) * decode ** 2 + mixed * long ** 2) / (2 * step)
        tpot = step / f.tau
        ttft = residual + decode + fixed + each * (1 + per_step / 2)
        new_n = min(max_seqs, max(1.0, rps * (ttft + output * tpot)))
        if abs(new_n - n) < 1e-6:
            break
        n = new_n
    stable = rps * (ttft + output * tpot) <= max_seqs + 1e-6
    steps = max(output - 1, 1)
    joined = poisson_quantile(QUANTILE, rps * steps * tpot)   # prompts during its decode
    tpot99 = (steps / f.tau * decode + joined * (mixed / max(per_step, 1e-12) * fixed + each)) \
        / steps
    crowd = poisson_quantile(QUANTILE, per_step)              # prompts arriving in one step
    # The step in progress at arrival: one with prompts when they fill over 1% of the time.
    in_progress = decode + fixed + max(crowd, 1) * each if mixed * long > 0.01 * step else decode
    ttft99 = in_progress + decode + fixed + (1 + crowd) * each
    return Prediction(rps, n, tpot * 1000, ttft * 1000, tpot99 * 1000, ttft99 * 1000,
                      rps * output, stable)


def _mean_step(rps: float, decode: float, fixed: float, each: float) -> tuple[float, bool]:
    """The mean step S = decode + (1 - exp(-rps S)) fixed + rps S each (prompts arrive at
    rps during a step and join the next), and whether it exists (prompts do not need
    every second). The right side minus S falls from >= 0 at S = decode to <= 0 at
    (decode + fixed) / (1 - rps each): bisection finds where it crosses."""
    if rps * each >= 1:
        return math.inf, False
    lo, hi = decode, (decode + fixed) / (1 - rps * each)
    for _ in range(200):
        mid = (lo + hi) / 2
        if decode + (1 - math.exp(-rps * mid)) * fixed + rps * mid * each >= mid:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2, True


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


def weight_bytes(ctx) -> int:
    """Bytes of the optimized model's weights, as a step reads them: the quantized
    summary's figure, else the parameters at the target's compute dtype (the figure the
    KV plan and the cost model both use)."""
    quantized = ctx.artifacts.quantized
    if quantized is not None:
        return int(quantized.summary["weight_bytes"])
    size = COMPUTE_BYTES[ctx.target.weights.dtype]
    return sum(p.numel() for p in ctx.artifacts.model.parameters()) * size
