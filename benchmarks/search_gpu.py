"""Issue 22 on the GPU: the 8B shape searched for this machine's hardware with an SLO, and
each searched candidate's predicted p99s against `dwc bench`'s measurement.

1. The Llama-3-8B-shaped checkpoint (random weights, perf_gpu.py) and a build file with
   an SLO (`--latency-ms`, `--ttft-ms`, `--rps`; 512-token prompts, 128 out) and a loose
   quality budget (random weights: the gate is not what is measured here).
2. `dwc build --target auto` (the hardware of this GPU: every target of it is a
   candidate; `search.max_minutes` from `--max-minutes`): the search's wall time against
   the goal (10 minutes), its table (manifest `search.candidates`).
3. The winner, and with `--bench-all` every other torch-triton candidate that was costed
   (built again with `-t <target>`: the pass cache restores its calibration and
   quantization), measured by `dwc bench` online at the rate `tune` predicted it can
   serve (Poisson arrivals, the SLO's prompt and output lengths): measured p99 TPOT /
   TTFT beside the predicted ones.

    DWC_COMMIT=<hash> python3 benchmarks/search_gpu.py --out $OUT [--bench-all]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from perf_gpu import prepare_8b  # noqa: E402

GOAL_SECONDS = 600


def dwc(*argv: str) -> tuple[int, dict, float]:
    """`python -m dwc ... --json`: exit code, the JSON it printed last, seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dwc", *argv, "--json"], capture_output=True,
                          text=True)
    seconds = round(time.perf_counter() - t0, 1)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        out = {"error": {"message": (proc.stdout + proc.stderr)[-2000:]}}
    return proc.returncode, out, seconds


def build_file(args, report: dict) -> Path:
    if args.smoke:  # the example model, for the CPU hardware
        path = args.work / "model.yaml"
        args.work.mkdir(parents=True, exist_ok=True)
        example = ROOT / "examples" / "stdlib-coder"
        path.write_text(f"name: smoke\nmodel: {example / 'checkpoint'}\n"
                        f"calibration: {{data: {example / 'calib.txt'}, samples: 8, seq_len: 128}}\n"
                        f"evaluation: {{data: {example / 'eval.txt'}, samples: 8, seq_len: 128, "
                        "max_ppl_increase_pct: 100}\ndraft: none\n")
    else:
        path = prepare_8b(args.work / "llama3-8b-shape", report)
    path.write_text(path.read_text() +
                    f"slo: {{target_latency_ms: {args.latency_ms}, target_ttft_ms: "
                    f"{args.ttft_ms}, target_rps: {args.rps}, prompt_tokens: 512, "
                    f"output_tokens: 128}}\nsearch: {{max_minutes: {args.max_minutes}}}\n")
    return path


def bench(bundle: Path, row: dict, args) -> dict:
    """`dwc bench` online at the candidate's predicted rate (one replica's)."""
    rate = max(row["max_rps"] or 0.5, 0.5)
    code, out, seconds = dwc("bench", str(bundle), "--no-baseline", "--num-prompts", "32",
                             "--input-len", "512", "--output-len", "128", "--rps", f"{rate:.3g}",
                             "--requests", str(args.requests))
    if code:
        return {"error": out.get("error"), "seconds": seconds}
    online = out["online"]
    return {"rps": online["rps"], "achieved_rps": online["achieved_rps"],
            "tpot_p99_ms": online["tpot_ms"]["p99"], "ttft_p99_ms": online["ttft_ms"]["p99"],
            "predicted_tpot_p99_ms": row["tpot_p99_ms"],
            "predicted_ttft_p99_ms": row["ttft_p99_ms"], "seconds": seconds}


def _g(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--latency-ms", type=float, default=50.0, help="the SLO's p99 TPOT")
    ap.add_argument("--ttft-ms", type=float, default=2000.0, help="the SLO's p99 TTFT")
    ap.add_argument("--rps", type=float, default=20.0, help="the SLO's request rate")
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--requests", type=int, default=120, help="measured requests per bench")
    ap.add_argument("--bench-all", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="the example model searched for this CPU: checks the script's paths")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    report = {"benchmark": "search_gpu", "device": device,
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "slo": {"target_latency_ms": args.latency_ms, "target_ttft_ms": args.ttft_ms,
                      "target_rps": args.rps}}
    save = lambda: (args.out / "search_gpu.json").write_text(json.dumps(report, indent=1))  # noqa: E731,E501
    path = build_file(args, report)
    winner_dir = args.work / "bundle-search"
    code, out, seconds = dwc("build", str(path), "--target", "auto", "-o", str(winner_dir))
    report["search"] = {"exit": code, "seconds": seconds, "goal_seconds": GOAL_SECONDS,
                        "result": out}
    save()
    if code:
        print(f"search exit {code} after {seconds} s: {json.dumps(out)[:1500]}")
        return 1
    rows = json.loads((winner_dir / "manifest.json").read_text())["search"]["candidates"]
    report["search"]["candidates"] = rows
    save()
    report["bench"] = {}
    for row in rows:
        runtime = row["backend"] == "torch-triton" and row["max_rps"]
        if row["status"] == "winner":
            report["bench"][row["target"]] = bench(winner_dir, row, args)
        elif args.bench_all and runtime:
            bundle = args.work / f"bundle-{row['target']}"
            c, o, s = dwc("build", str(path), "-t", row["target"], "-o", str(bundle))
            report["bench"][row["target"]] = bench(bundle, row, args) if c == 0 else \
                {"build_error": o.get("error"), "seconds": s}
        save()
    print(f"\n{report['device']}: search {seconds} s (goal {GOAL_SECONDS} s), "
          f"SLO p99 TPOT {args.latency_ms} ms, TTFT {args.ttft_ms} ms, {args.rps} rps")
    print(f"{'target':<22}{'status':<9}{'ppl +%':>10}{'$/1M':>12}{'rps':>9}"
          f"{'TPOT p99 pred/meas':>22}{'TTFT p99 pred/meas':>22}")
    for row in rows:
        b = report["bench"].get(row["target"], {})
        print(f"{row['target']:<22}{row['status']:<9}{_g(row['delta_pct']):>10}"
              f"{_g(row['usd_per_million_output_tokens']):>12}{_g(row['max_rps']):>9}"
              f"{str(row['tpot_p99_ms']) + ' / ' + str(b.get('tpot_p99_ms')):>22}"
              f"{str(row['ttft_p99_ms']) + ' / ' + str(b.get('ttft_p99_ms')):>22}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
