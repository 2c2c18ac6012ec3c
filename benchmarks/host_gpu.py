"""Where a batch-1 decode step's host time goes (issue 6).

The 8B shape's bf16 decode step took 7.6 ms of which the captured graph's replay is
4.7 ms: the rest is host time between replays. This script times each phase of
`Engine.step` (schedule, runner inputs + replay launch, sampling with its device sync,
advance) over 100 steps at batch 1 and 128 (128-token prompts), and writes a cProfile of the
same steps, so the fix can be aimed.

    DWC_COMMIT=<hash> python3 benchmarks/host_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from build_8b import make_checkpoint  # noqa: E402

from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.fusion import DEFAULT_PLAN  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402


def prompt(i: int) -> list[int]:
    return [10 + (i * 131 + j) % 4000 for j in range(128)]


def phase_times(engine: Engine, steps: int, batch: int) -> dict:
    """Mean ms per decode step of each phase, and of the replayed graph alone."""
    seqs = [engine.add(prompt(i), SamplingParams(max_tokens=steps + 20, ignore_eos=True))
            for i in range(batch)]
    while any(s.num_computed < 128 for s in seqs):
        engine.step()
    for _ in range(5):
        engine.step()
    totals = {"schedule": 0.0, "run": 0.0, "sample": 0.0, "advance": 0.0}
    torch.cuda.synchronize()
    t_all = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        chunks = engine.scheduler.schedule()
        t1 = time.perf_counter()
        logits = engine.runner.run(chunks, engine.blocks)
        t2 = time.perf_counter()
        tokens = engine._new_tokens(chunks, logits)
        t3 = time.perf_counter()
        for c, t in zip(chunks, tokens):
            engine._advance(c, t)
        t4 = time.perf_counter()
        for key, a, b in (("schedule", t0, t1), ("run", t1, t2), ("sample", t2, t3),
                          ("advance", t3, t4)):
            totals[key] += b - a
    torch.cuda.synchronize()
    out = {k: round(v / steps * 1000, 3) for k, v in totals.items()}
    out["step"] = round((time.perf_counter() - t_all) / steps * 1000, 3)
    for seq in seqs:
        engine.abort(seq)
    graphs = engine.runner.graphs
    g = graphs.graphs[next(s for s in graphs.sizes if s >= batch)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        g.replay()
    torch.cuda.synchronize()
    out["replay_only"] = round((time.perf_counter() - t0) / 50 * 1000, 3)
    return out


def profiled(engine: Engine, steps: int, batch: int) -> tuple[str, float]:
    """cProfile of `generate` (`batch` 128-token prompts, `steps` new tokens), tok/s."""
    params = SamplingParams(max_tokens=steps, ignore_eos=True)
    engine.generate([prompt(1000 + i) for i in range(batch)], params)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    engine.generate([prompt(2000 + i) for i in range(batch)], params)
    torch.cuda.synchronize()
    prof.disable()
    rate = batch * steps / (time.perf_counter() - t0)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue(), round(rate, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "llama3-8b-shape"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt)
    report = {"benchmark": "host_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "runs": []}
    engine = Engine(ckpt, EngineConfig(num_blocks=8192, max_num_seqs=256,
                                       max_num_batched_tokens=8192), fusion=DEFAULT_PLAN)
    for batch in args.batch:
        run = {"batch": batch, "phases_ms": phase_times(engine, 100, batch)}
        stats, run["generate_tok_s"] = profiled(engine, 64, batch)
        report["runs"].append(run)
        (args.out / f"host_gpu_cprofile_{batch}.txt").write_text(stats)
        print(stats[:3500])
        print(json.dumps(run))
    (args.out / "host_gpu.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
