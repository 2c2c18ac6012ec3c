"""Where a decode step's host time goes on the GPU machine (issue 18: under 1 ms at
batch 256).

The example checkpoint (examples/stdlib-coder, 21M parameters) runs on the GPU with
CUDA graphs and asynchronous scheduling, so its decode step costs the GPU a fraction of
a millisecond and the host sets the pace: the wall time per step is the host's. For each
batch (128-token prompts) the script reports the wall ms per decode step with overlap,
the ms spent waiting for the GPU (the rest is host time), the replayed graph alone, and
a cProfile of 100 steps at the largest batch, and batch 128 with sampled requests
(temperature 0.8, top-p 0.95). Run it twice in one call to compare an
earlier tree (`PYTHONPATH=.ab/base`, made by `git archive <commit> | tar -x -C .ab/base`):

    DWC_COMMIT=<hash> python3 benchmarks/host_gpu.py --out $OUT
    PYTHONPATH=.ab/base:$PYTHONPATH DWC_COMMIT=<base> python3 benchmarks/host_gpu.py \
        --out $OUT --tag base
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

import dwc  # noqa: E402
from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.fusion import DEFAULT_PLAN  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402
from throughput_gpu import WaitClock  # noqa: E402

CHECKPOINT = ROOT / "examples" / "stdlib-coder" / "checkpoint"


def prompt(i: int) -> list[int]:
    return [10 + (i * 131 + j) % 4000 for j in range(128)]


def decode_steps(engine: Engine, batch: int, steps: int, profile: bool = False,
                 temperature: float = 0.0) -> dict:
    """`steps` decode steps at `batch` after the prompts are in: wall and wait ms per
    step (and the cProfile text when `profile`); `temperature` > 0: sampled requests
    (top-p 0.95, unseeded), as an OpenAI client sends by default."""
    params = SamplingParams(max_tokens=steps + 30, ignore_eos=True, temperature=temperature,
                            top_p=0.95 if temperature > 0 else 1.0)
    seqs = [engine.add(prompt(i), params) for i in range(batch)]
    while any(s.num_computed < 130 for s in seqs):
        engine.step()
    for _ in range(5):
        engine.step()
    clock, prof = WaitClock(), cProfile.Profile() if profile else None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(steps):
        engine.step()
    if prof:
        prof.disable()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    clock.close()
    for s in seqs:
        engine.abort(s)
    while engine.has_work():
        engine.step()
    out = {"wall_ms": round(wall * 1e3, 3), "wait_ms": round(clock.seconds / steps * 1e3, 3),
           "host_ms": round((wall - clock.seconds / steps) * 1e3, 3)}
    if prof:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        out["profile"] = text.getvalue()
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time, with every wall time kept."""
    runs = sorted(runs, key=lambda r: r["wall_ms"])
    return dict(runs[len(runs) // 2], all_wall_ms=[r["wall_ms"] for r in runs])


def replay_ms(engine: Engine, batch: int) -> float:
    graphs = engine.runner.graphs
    g = graphs.graphs[next(s for s in graphs.sizes if s >= batch)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        g.replay()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / 100 * 1e3, 3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="head")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 128, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sampled-batch", type=int, nargs="*", default=[128],
                    help="batches also run with sampled requests (temperature 0.8)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each batch this many times, report the median")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = Engine(CHECKPOINT, EngineConfig(num_blocks=8192, max_num_seqs=256,
                                             max_num_batched_tokens=8192), fusion=DEFAULT_PLAN)
    report = {"benchmark": "host_gpu", "tag": args.tag, "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "dwc": str(Path(dwc.__file__).parent), "model": "examples/stdlib-coder (21M)",
              "runs": {}}
    for batch in args.batch:
        run = median_run([decode_steps(engine, batch, args.steps) for _ in range(args.repeat)])
        run["replay_only_ms"] = replay_ms(engine, batch)
        report["runs"][f"bs{batch}"] = run
    for batch in args.sampled_batch:
        run = median_run([decode_steps(engine, batch, min(args.steps, 50), temperature=0.8)
                          for _ in range(args.repeat)])
        run["replay_only_ms"] = replay_ms(engine, batch)
        report["runs"][f"bs{batch}-sampled"] = run
    if not args.no_profile:
        top = max(args.batch)
        prof = decode_steps(engine, top, 100, profile=True)
        (args.out / f"host_gpu_cprofile_{args.tag}_bs{top}.txt").write_text(prof["profile"])
        print(prof["profile"][:4000])
    (args.out / f"host_gpu_{args.tag}.json").write_text(json.dumps(report, indent=1))
    print(f"host per decode step ({args.tag}, {report['commit']}): batch | wall ms | wait ms"
          " | host ms | graph replay ms")
    for key, run in report["runs"].items():
        print(f"{key:>12} | {run['wall_ms']:7.3f} | {run['wait_ms']:7.3f} | {run['host_ms']:7.3f}"
              f" | {run['replay_only_ms']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
