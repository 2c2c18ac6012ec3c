"""`dwc bench`: offline throughput and online latency of a torch-triton bundle.

Offline: N prompts of `input_len` random tokens, `output_len` new tokens each, all
submitted at once; output tokens per second. The transformers baseline (`generate`, the
same prompts as one batch, greedy) is measured in the same run.
Online: requests arrive as a Poisson process at `rps`; for each, time to first token and
time per output token; p50 / p99 and the achieved request rate, against the bundle's SLO.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from dwc.runtime.engine import Engine
from dwc.runtime.sequence import SamplingParams


@dataclass
class BenchConfig:
    num_prompts: int = 16
    input_len: int = 128
    output_len: int = 64
    rps: float = 2.0
    rps_levels: tuple[float, ...] = (2.0,)  # `dwc bench --rps`: the online levels measured
    online_requests: int = 16
    online_warmup: int = 0    # first requests of the arrivals, sent but not measured
    baseline: bool = True
    seed: int = 0


def prompts(engine: Engine, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = len(engine.tokenizer)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def sync(engine: Engine) -> None:
    """Wait for the engine's device (timings around steps need it)."""
    if engine.runner.device == "cuda":
        torch.cuda.synchronize()


def offline(engine: Engine, cfg: BenchConfig) -> dict:
    batch = prompts(engine, cfg.num_prompts, cfg.input_len, cfg.seed)
    params = SamplingParams(max_tokens=cfg.output_len, ignore_eos=True)
    engine.generate([batch[0][:8]], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    sync(engine)
    t0 = time.perf_counter()
    engine.generate(batch, params)
    sync(engine)
    seconds = time.perf_counter() - t0
    result = {"prompts": cfg.num_prompts, "input_len": cfg.input_len,
              "output_len": cfg.output_len, "seconds": round(seconds, 4),
              "output_tok_s": round(cfg.num_prompts * cfg.output_len / seconds, 2)}
    if cfg.baseline:
        result["transformers_output_tok_s"] = _baseline(engine, batch, cfg.output_len)
    return result


def _baseline(engine: Engine, batch: list[list[int]], output_len: int) -> float:
    """transformers' own generate on the same weights, prompts and lengths."""
    model = engine.runner.hf_model
    ids = torch.tensor(batch, device=engine.runner.device)
    with torch.inference_mode():
        sync(engine)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len,
                       do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        sync(engine)
    return round(len(batch) * output_len / (time.perf_counter() - t0), 2)


def online(engine: Engine, cfg: BenchConfig, on_step=None) -> dict:
    """Poisson arrivals, stepped in this thread: a request joins at its arrival time. The
    first `online_warmup` requests load the engine but are not measured (steady state).
    `on_step(seconds)`, if given, sees every step's duration (diagnostics)."""
    total = cfg.online_warmup + cfg.online_requests
    batch = prompts(engine, total, cfg.input_len, cfg.seed + 2)
    arrivals = _poisson_arrivals(len(batch), cfg.rps, cfg.seed + 1)
    params = SamplingParams(max_tokens=cfg.output_len, ignore_eos=True)
    pending = list(zip(arrivals, batch))
    started: dict[int, float] = {}
    first: dict[int, float] = {}
    done: dict[int, tuple[float, int]] = {}
    measured = []
    t0 = time.perf_counter()
    live = []
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            at, ids = pending.pop(0)
            seq = engine.add(ids, params)
            started[seq.id] = at
            if total - len(pending) > cfg.online_warmup:
                measured.append(seq.id)
            live.append(seq)
        if not engine.has_work():
            time.sleep(min(0.01, max(0.0, pending[0][0] - now)))
            continue
        engine.step()
        sync(engine)
        end = time.perf_counter() - t0
        if on_step:
            on_step(end - now)
        for seq in live:
            if seq.output_ids and seq.id not in first:
                first[seq.id] = end
            if seq.finish_reason and seq.id not in done:
                done[seq.id] = (end, len(seq.output_ids))
        live = [seq for seq in live if seq.id not in done]
    return _online_report(cfg, measured, started, first, done)


def _online_report(cfg: BenchConfig, measured: list, started: dict, first: dict,
                   done: dict) -> dict:
    """TTFT and TPOT percentiles of the measured requests, and the rates achieved."""
    ttft = [first[i] - started[i] for i in measured]
    tpot = [(done[i][0] - first[i]) / (done[i][1] - 1) for i in measured if done[i][1] > 1]
    window = max(done[i][0] for i in measured) - started[measured[0]]
    # While the measured requests arrived, how fast requests completed: below the offered
    # rate when the engine falls behind (a queue that grows).
    lo, hi = started[measured[0]], started[measured[-1]]
    finished = sum(1 for t, _ in done.values() if lo <= t <= hi)
    return {"rps": cfg.rps, "requests": len(measured), "warmup_requests": cfg.online_warmup,
            "achieved_rps": round(len(measured) / window, 3),
            "completed_rps_while_arriving": round(finished / (hi - lo), 3) if hi > lo else None,
            "arrival_rps": round((len(measured) - 1) / (hi - lo), 3) if hi > lo else None,
            "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot)}


def _poisson_arrivals(n: int, rps: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of n requests at `rps`."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rps)
        out.append(t)
    return out


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def pick(q):
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)
    if not ordered:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99),
            "mean": round(1000 * sum(ordered) / len(ordered), 3)}


def against_slo(slo: dict | None, result: dict) -> dict | None:
    """Each SLO figure the run measured, with the measurement and whether it held."""
    if not slo:
        return None
    checks = {}
    if slo.get("target_latency_ms"):
        checks["target_latency_ms"] = (slo["target_latency_ms"], result["online"]["tpot_ms"]["p99"])
    if slo.get("target_ttft_ms"):
        checks["target_ttft_ms"] = (slo["target_ttft_ms"], result["online"]["ttft_ms"]["p99"])
    return {k: {"target": t, "measured_p99": m, "met": m is not None and m <= t}
            for k, (t, m) in checks.items()}


def cost(usd_per_hour: float, output_tok_s: float, requests_s: float) -> dict:
    """Dollars per million output tokens and per million requests, at a throughput, on
    one device of the target's price."""
    per_second = usd_per_hour / 3600
    return {"usd_per_hour": usd_per_hour,
            "usd_per_million_output_tokens": round(per_second / output_tok_s * 1e6, 4),
            "usd_per_million_requests": round(per_second / requests_s * 1e6, 2)}
