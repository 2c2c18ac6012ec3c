"""Issue 18's table: the 8B shape's throughput path on the H200, built by dwc.

Makes the Llama-3-8B-shaped checkpoint (random weights), builds it with
`dwc build -t h200-fp8` (no draft, `tune` not calibrating: it is not measured here), and
measures in one run, on one engine:

- offline throughput (all prompts at once, greedy, ignore EOS) at TensorRT-LLM's four
  published points: 128/128 (2,000 prompts), 128/2048, 2048/128 and 1000/1000, with
  asynchronous scheduling on, and 128/128 again with it off and at 256 sequences;
- decode tok/s at batch 1, 8, 32, 128, 256 (128 in / 256 out), and of the decode steps
  alone at 128 and 8k tokens of context (batch 1, 8, 32: split-KV attention);
- host time per step at batch 1, 128, 256: the step's wall time less the time spent
  waiting for the GPU (asynchronous steps), against the sync step's wall time;
- a mixed step (a 512-token prompt joining 255 decoding sequences) against its roofline
  (FLOPs over the measured FP8 GEMM rate, weight + KV bytes over the read bandwidth);
- TTFT of one 1k and one 8k prompt; peak GPU memory.

    DWC_COMMIT=<hash> python3 benchmarks/throughput_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from perf_gpu import build, bytes_per_token, prepare_8b, prompts, read_bandwidth, ttft_ms  # noqa: E402,E501

from dwc.runtime import inflight  # noqa: E402
from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402

# TensorRT-LLM's published figures (Llama-3.1-8B FP8, H200, TP1) and issue 18's goals.
TRTLLM = {"128/128": 27911, "128/2048": 26221, "2048/128": 3538, "1000/1000": 17744}
GOALS = {"128/128": 30000, "1000/1000": 19000, "2048/128": 3800}
POINTS = {"128/128": (128, 128, 2000), "128/2048": (128, 2048, 512),
          "2048/128": (2048, 128, 512), "1000/1000": (1000, 1000, 512)}
LINEAR_PARAMS_8B = 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)  # per token, FP8


def fp8_gemm_rate() -> float:
    """FLOP/s of an 8192^3 FP8 `_scaled_mm` (the compute ceiling), median of 20."""
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    times = []
    for _ in range(25):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * 8192 ** 3 / statistics.median(times[5:])


def gemm_table(shapes=((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)),
               rows=(128, 256, 512, 8192)) -> list[dict]:
    """The 8B shape's FP8 projections at decode / prefill sizes: `_scaled_mm` with
    row-wise scales (what Fp8Linear runs) against one tensor-wise scale and bf16, us each
    and the rate (weights cycled past L2)."""
    out = []
    for n, k in shapes:
        ws = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(4)]
        for m in rows:
            a = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
            sa, sb, one = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda"), \
                torch.ones((), device="cuda")
            ab = a.to(torch.bfloat16)
            wb = [w.to(torch.bfloat16) for w in ws[:2]]
            row = {"m": m, "n": n, "k": k}
            for name, fn in (
                    ("rowwise", lambda i: torch._scaled_mm(a, ws[i % 4].t(), scale_a=sa, scale_b=sb,
                                                           out_dtype=torch.bfloat16)),
                    ("tensorwise", lambda i: torch._scaled_mm(a, ws[i % 4].t(), scale_a=one,
                                                              scale_b=one,
                                                              out_dtype=torch.bfloat16)),
                    ("bf16", lambda i: ab @ wb[i % 2].t())):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                for i in range(5):
                    fn(i)
                start.record()
                for i in range(40):
                    fn(i)
                end.record()
                torch.cuda.synchronize()
                us = start.elapsed_time(end) / 40 * 1e3
                row[f"{name}_us"] = round(us, 1)
                row[f"{name}_tflops"] = round(2 * m * n * k / us / 1e6, 1)
            out.append(row)
        del ws
    torch.cuda.empty_cache()
    return out


def offline(engine: Engine, n_in: int, n_out: int, n: int, seed: int = 0) -> dict:
    params = SamplingParams(max_tokens=n_out, ignore_eos=True)
    engine.generate(prompts(4, n_in, seed=seed + 1000), SamplingParams(max_tokens=4))  # warm
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate(prompts(n, n_in, seed=seed), params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert all(len(o.output_ids) == n_out for o in outs)
    return {"prompts": n, "input": n_in, "output": n_out, "seconds": round(seconds, 2),
            "output_tok_s": round(n * n_out / seconds, 1),
            "preemptions": engine.scheduler.preemptions}


class WaitClock:
    """Seconds the engine spends waiting for the GPU in `InFlight.wait`."""

    def __init__(self):
        self.seconds = 0.0
        self._wait = inflight.InFlight.wait
        clock = self

        def timed(flight):
            t0 = time.perf_counter()
            try:
                return clock._wait(flight)
            finally:
                clock.seconds += time.perf_counter() - t0
        inflight.InFlight.wait = timed

    def close(self):
        inflight.InFlight.wait = self._wait


def host_per_step(engine: Engine, batch: int, steps: int = 60) -> dict:
    """Decode steps at `batch` (128-token contexts): wall ms per step with and without
    overlap, and the host's share of an overlapped step (wall less waiting)."""
    out = {}
    for overlap in (True, False):
        engine.set_overlap(overlap)
        seqs = [engine.add(p, SamplingParams(max_tokens=steps + 40, ignore_eos=True))
                for p in prompts(batch, 128, seed=77 + overlap)]
        while any(s.num_computed < 130 for s in seqs):
            engine.step()
        clock = WaitClock()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
        clock.close()
        key = "async" if overlap else "sync"
        out[f"{key}_step_ms"] = round(wall * 1e3, 3)
        if overlap:
            out["host_ms"] = round((wall - clock.seconds / steps) * 1e3, 3)
        for s in seqs:
            engine.abort(s)
        while engine.has_work():
            engine.step()
    engine.set_overlap(True)
    return out


def mixed_step(engine: Engine, rate: float, bandwidth: float, weight_bytes: int) -> dict:
    """One step carrying a 512-token prompt beside 255 decoding sequences (sync, timed
    alone), against its roofline: replayed piecewise, and eager (the pieces set aside)."""
    pieces = engine.runner.pieces
    out = {}
    for mode in ("piecewise", "eager"):
        engine.runner.pieces = pieces if mode == "piecewise" else None
        out[mode] = _mixed_times(engine, seed=300 if mode == "piecewise" else 400)
    engine.runner.pieces = pieces
    tokens = 512 + 255
    flops = 2 * LINEAR_PARAMS_8B * tokens + 2 * 4096 * 128256 * 256  # + lm_head rows
    kv_bytes = 255 * 140 * 64 * 1024  # FP8 KV: 64 KiB per token of context
    roofline = max(flops / rate, (weight_bytes + kv_bytes) / bandwidth)
    step = out["piecewise"]["step"] if pieces is not None else out["eager"]["step"]
    return {"tokens": tokens, "step_ms": round(step * 1e3, 3),
            "eager_step_ms": round(out["eager"]["step"] * 1e3, 3),
            "decode_step_ms": round(out["eager"]["decode"] * 1e3, 3),
            "roofline_ms": round(roofline * 1e3, 3), "x_roofline": round(step / roofline, 2)}


def _mixed_times(engine: Engine, seed: int) -> dict:
    """Median seconds of the mixed step (5 tries, the first dropped) and of a decode step.
    Each mode its own prompts: a prompt seen before would hit the prefix cache."""
    engine.set_overlap(False)
    seqs = [engine.add(p, SamplingParams(max_tokens=64, ignore_eos=True))
            for p in prompts(255, 128, seed=55)]
    while any(s.num_computed < 130 for s in seqs):
        engine.step()
    times = []
    for i in range(5):
        engine.add(prompts(1, 512, seed=seed + i)[0], SamplingParams(max_tokens=2))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    decode_alone = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        decode_alone.append(time.perf_counter() - t0)
    for s in seqs:
        engine.abort(s)
    while engine.has_work():
        engine.step()
    engine.set_overlap(True)
    return {"step": statistics.median(times[1:]), "decode": statistics.median(decode_alone)}


def profile_prefill(engine: Engine, n: int = 4, length: int = 2048) -> list[dict]:
    """Kernel times of one step prefilling `n` prompts of `length` tokens (the 2048/128
    point's steps), sync, after the same shapes ran once."""
    from torch.profiler import ProfilerActivity, profile

    engine.set_overlap(False)
    params = SamplingParams(max_tokens=1)
    engine.generate(prompts(n, length, seed=41), params)
    for p in prompts(n, length, seed=42):
        engine.add(p, params)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    while engine.has_work():
        engine.step()
    engine.set_overlap(True)
    return [{"name": e.key[:80], "calls": e.count, "device_us": round(e.device_time_total, 1)}
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:15]]


def profile_mixed(engine: Engine) -> dict:
    """Host (CPU) and device time of the mixed step of `mixed_step` (a 512-token prompt
    beside 255 decoding sequences) as the engine runs it, and its kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    engine.set_overlap(False)
    seqs = [engine.add(p, SamplingParams(max_tokens=64, ignore_eos=True))
            for p in prompts(255, 128, seed=55)]
    while any(s.num_computed < 130 for s in seqs):
        engine.step()
    engine.add(prompts(1, 512, seed=299)[0], SamplingParams(max_tokens=2))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    for s in seqs:
        engine.abort(s)
    while engine.has_work():
        engine.step()
    engine.set_overlap(True)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                         "cudaLaunchKernelExC"))
    kernels = [{"name": e.key[:80], "calls": e.count, "device_us": round(e.self_device_time_total, 1),
                "cpu_us": round(e.cpu_time_total, 1)}
               for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]]
    top_cpu = [{"name": e.key[:80], "calls": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1)}
               for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]]
    return {"launches": launches, "kernels": kernels, "top_self_cpu": top_cpu,
            "device_us_total": round(sum(e.self_device_time_total for e in events), 1)}


def decode(engine: Engine) -> dict:
    out = {}
    for batch in (1, 8, 32, 128, 256):
        engine.generate(prompts(batch, 128, seed=99), SamplingParams(max_tokens=4))
        r = offline(engine, 128, 256, batch, seed=batch)
        out[f"bs{batch}"] = r["output_tok_s"]
    return out


def decode_only(engine: Engine, batch: int, n_in: int, n_out: int = 128) -> float:
    """Output tok/s of the decode steps alone at an n_in-token context: the time of n_out
    tokens less the time of one (the prefill), new prompts each time (no prefix hits)."""
    def timed(n: int, seed: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(prompts(batch, n_in, seed=seed),
                        SamplingParams(max_tokens=n, ignore_eos=True))
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(4, seed=n_in + 7)  # the shapes warm
    first, full = timed(1, seed=n_in + 8), timed(n_out, seed=n_in + 9)
    return round(batch * (n_out - 1) / (full - first), 1)


def long_context(engine: Engine) -> dict:
    """Issue 19's long-context goal: decode at 8k context within 15% of 128 context."""
    out = {f"bs{b} c{c}": decode_only(engine, b, c) for b, c in
           ((1, 128), (1, 8000), (8, 128), (8, 8000), (32, 8000))}
    out["bs1 8k / 128"] = round(out["bs1 c8000"] / out["bs1 c128"], 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="128/128 and host times only")
    ap.add_argument("--profile-only", action="store_true",
                    help="the mixed step (timed and profiled) and the prefill profile only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "throughput_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "torch": torch.__version__}
    save = lambda: (args.out / "throughput_gpu.json").write_text(json.dumps(report, indent=1))  # noqa: E731,E501
    bandwidth, rate = read_bandwidth(), fp8_gemm_rate()
    report.update(read_bandwidth_gbs=round(bandwidth / 1e9, 1),
                  fp8_gemm_tflops=round(rate / 1e12, 1))
    build_file = prepare_8b(args.work / "llama3-8b-shape", report)
    bundle = args.work / "bundle-fp8"
    build_file.write_text(build_file.read_text() + "passes: {tune: {calibrate: false}}\n")
    report["build_fp8_seconds"] = build(build_file, "h200-fp8", bundle)
    save()
    t0 = time.perf_counter()
    plan = json.loads((bundle / "manifest.json").read_text())["kv_cache"]
    engine = Engine.from_bundle(bundle, EngineConfig.from_plan(
        plan, max_num_seqs=args.max_num_seqs))
    report["engine"] = {"load_seconds": round(time.perf_counter() - t0, 1),
                        "num_blocks": len(engine.blocks.blocks),
                        "max_num_seqs": engine.scheduler.max_num_seqs,
                        "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
                        "plan": {k: plan[k] for k in ("max_num_seqs", "max_num_batched_tokens")}}
    torch.cuda.reset_peak_memory_stats()
    if args.profile_only:
        report["mixed_step"] = mixed_step(engine, rate, bandwidth,
                                          bytes_per_token(bundle / "model"))
        report["profile_mixed_767"] = profile_mixed(engine)
        save()
        report["profile_prefill_4x2048"] = profile_prefill(engine)
        report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        save()
        print(json.dumps({k: report[k] for k in ("mixed_step", "profile_mixed_767",
                                                   "profile_prefill_4x2048")}, indent=1))
        return 0
    res = report["results"] = {}
    report["warm_up_128_128"] = offline(engine, 128, 128, 600, seed=5)  # pinned pools, shapes
    for seqs in (256, args.max_num_seqs):
        engine.set_limits(max_num_seqs=seqs)
        res[f"128/128 {seqs} seqs"] = offline(engine, *POINTS["128/128"])
        save()
    engine.set_limits(max_num_seqs=256)
    engine.set_overlap(False)
    res["128/128 256 seqs sync"] = offline(engine, *POINTS["128/128"])
    engine.set_overlap(True)
    best = max((256, args.max_num_seqs), key=lambda n: res[f"128/128 {n} seqs"]["output_tok_s"])
    res["128/128"] = res[f"128/128 {best} seqs"]
    engine.set_limits(max_num_seqs=best)
    report["engine"]["chosen_max_num_seqs"] = best
    report["host"] = {f"bs{b}": host_per_step(engine, b) for b in (1, 128, 256)}
    save()
    if not args.quick:
        for point in ("1000/1000", "2048/128", "128/2048"):
            res[point] = offline(engine, *POINTS[point])
            save()
        report["mixed_step"] = mixed_step(engine, rate, bandwidth,
                                          bytes_per_token(bundle / "model"))
        report["decode_fp8"] = decode(engine)
        report["decode_fp8_long_context"] = long_context(engine)
        save()
        report["ttft_ms"] = {"1k": ttft_ms(engine, 1024), "8k": ttft_ms(engine, 8000)}
        from perf_gpu import profile_step

        report["profile_bs256_eager"] = profile_step(engine, 256)
        report["profile_prefill_4x2048"] = profile_prefill(engine)
        report["gemm"] = gemm_table()
    report["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    save()
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report['device']} @ {report['commit']}: read {report['read_bandwidth_gbs']} GB/s, "
          f"FP8 GEMM {report['fp8_gemm_tflops']} TFLOP/s, build {report['build_fp8_seconds']} s, "
          f"engine {report['engine']}")
    print(f"{'point':<18}{'dwc tok/s':>11}{'TRT-LLM':>9}{'ratio':>7}{'goal':>7}{'s':>7}")
    for key, r in report["results"].items():
        base = TRTLLM.get(key)
        ratio = f"{r['output_tok_s'] / base:.2f}" if base else "-"
        print(f"{key:<18}{r['output_tok_s']:>11}{base or '-':>9}{ratio:>7}"
              f"{GOALS.get(key, '-'):>7}{r['seconds']:>7}")
    for row in report.get("profile_bs256_eager", [])[:8]:
        print(f"  {row['device_us_per_step']:>9} us  x{row['calls_per_step']:<6} {row['name']}")
    for row in report.get("gemm", []):
        print("  gemm", row)
    for key in ("host", "mixed_step", "decode_fp8", "decode_fp8_long_context", "ttft_ms",
                "peak_memory_gb"):
        if key in report:
            print(f"{key}: {report[key]}")


if __name__ == "__main__":
    sys.exit(main())
