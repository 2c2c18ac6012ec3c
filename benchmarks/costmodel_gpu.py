"""The cost model (dwc/perf/costmodel.py, the `tune` pass) against measurement on the H200
(issue 9): the Llama-3-8B shape (random weights) built `-t h200-fp8` with an SLO (on the
GPU, `tune` calibrates the model with short measurements), then `dwc bench`'s online
measurement (Poisson arrivals, 512-token prompts, 128 new tokens; warm-up requests not
counted) at three loads below the predicted maximum, beside the build's prediction at
the same rate, from the scheduler simulation (dwc/perf/loadsim.py) that `tune` reports (the
closed forms' errors are recorded too). Goal: predictions within 15% of measurements.

    DWC_COMMIT=<hash> python3 benchmarks/costmodel_gpu.py --out $OUT

Also records every step's duration and prompt tokens during the measurement (the
longest steps and the mean of steps with and without a prompt), to say where a miss
comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from build_8b import EXAMPLE, make_checkpoint  # noqa: E402

from dwc.perf.bench import BenchConfig, online  # noqa: E402
from dwc.perf.calibration import StepLog  # noqa: E402
from dwc.perf.costmodel import Calibration, Machine, ModelFigures, predict  # noqa: E402
from dwc.perf.loadsim import simulate  # noqa: E402
from dwc.runtime.engine import Engine  # noqa: E402

PROMPT, OUTPUT, TPOT_MS = 512, 128, 40.0


def build(work: Path) -> Path:
    ckpt = work / "llama3-8b-shape"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt)
    build_file = work / "model-slo.yaml"
    build_file.write_text(
        f"name: llama3-8b-shape\nmodel: {ckpt}\n"
        f"calibration: {{data: {EXAMPLE / 'calib.txt'}, samples: 32, seq_len: 256}}\n"
        f"evaluation: {{data: {EXAMPLE / 'eval.txt'}, samples: 8, seq_len: 256, "
        "max_ppl_increase_pct: 100}\ndraft: none\n"
        f"slo: {{target_latency_ms: {TPOT_MS}, prompt_tokens: {PROMPT}, "
        f"output_tokens: {OUTPUT}, max_context: 2048}}\n")
    bundle = work / "bundle-fp8-slo"
    proc = subprocess.run([sys.executable, "-m", "dwc", "build", str(build_file), "-t",
                           "h200-fp8", "-o", str(bundle), "--json", "--force"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"build failed: {proc.stdout[-1000:]} {proc.stderr[-2000:]}")
    return bundle


def summary(rows: list) -> dict:
    """Steps with and without prompts, by prompts per step, and the longest."""
    mixed = [s for s, _, p in rows if p]
    plain = [s for s, _, p in rows if not p]
    ms = lambda xs: round(1000 * statistics.mean(xs), 3) if xs else None  # noqa: E731
    by_prompts = {}
    for k in (1, 2, 3):
        xs = sorted(s for s, _, p in rows if p == k)
        if xs:
            by_prompts[k] = {"steps": len(xs), "mean_ms": ms(xs),
                             "p50_ms": round(1000 * xs[len(xs) // 2], 3)}
    return {"steps": len(rows), "decode_steps_mean_ms": ms(plain),
            "prompt_steps_mean_ms": ms(mixed), "prompt_steps": len(mixed),
            "by_prompts": by_prompts,
            "mean_sequences": round(statistics.mean(n for _, n, _ in rows), 1),
            "longest": [{"ms": round(1000 * s, 2), "sequences": n, "prompts": p}
                        for s, n, p in sorted(rows, reverse=True)[:6]]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.8])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = build(args.work)
    manifest = json.loads((bundle / "manifest.json").read_text())
    slo, plan = manifest["slo"], manifest["kv_cache"]
    hw = manifest["target"]["hardware"]
    tuning = json.loads((bundle / "reports" / "tuning.json").read_text())
    cal = tuning.get("calibration")
    machine = Machine(hw["memory_bandwidth_gbs"] * 1e9, max(hw["peak_tflops"].values()) * 1e12,
                      hw["usd_per_hour"], calibration=Calibration.from_dict(cal) if cal else None)
    figures = ModelFigures(manifest["quantization"]["weight_bytes"],
                           manifest["source"]["parameters"], plan["bytes_per_token"])
    engine = Engine.from_bundle(bundle)
    engine.generate([[5 + i] * PROMPT for i in range(8)], None)  # warm-up: prefill shapes
    report = {"benchmark": "costmodel_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "slo": slo, "calibration": cal, "max_num_seqs": plan["max_num_seqs"],
              "requests_per_level": args.requests, "warmup_per_level": args.warmup,
              "levels": []}
    top = slo["predicted"]["max_rps"]
    rows = []
    for load in args.loads:
        rps = round(top * load, 2)
        cfg = BenchConfig(input_len=PROMPT, output_len=OUTPUT, rps=rps,
                          online_requests=args.requests, online_warmup=args.warmup,
                          seed=int(load * 100))
        log = StepLog(engine)
        measured = online(engine, cfg, on_step=log)
        log.detach()
        p = predict(machine, figures, rps, PROMPT, OUTPUT, plan["max_num_seqs"])
        sim = simulate(machine, figures, rps, PROMPT, OUTPUT, plan["max_num_seqs"])
        err = lambda pred, meas: round(pred / meas - 1, 3)  # noqa: E731
        level = {"load": load, "rps": rps, "measured": measured, "predicted": p.as_dict(),
                 "simulated": sim.as_dict(), "steps": summary(log.rows),
                 "tpot_p99_error": err(sim.tpot_p99_ms, measured["tpot_ms"]["p99"]),
                 "ttft_p99_error": err(sim.ttft_p99_ms, measured["ttft_ms"]["p99"]),
                 "closed_form_tpot_p99_error": err(p.tpot_p99_ms, measured["tpot_ms"]["p99"]),
                 "closed_form_ttft_p99_error": err(p.ttft_p99_ms, measured["ttft_ms"]["p99"]),
                 "tpot_mean_error": err(sim.tpot_ms, measured["tpot_ms"]["mean"]),
                 "ttft_mean_error": err(sim.ttft_ms, measured["ttft_ms"]["mean"]),
                 "closed_form_tpot_mean_error": err(p.tpot_ms, measured["tpot_ms"]["mean"]),
                 "closed_form_ttft_mean_error": err(p.ttft_ms, measured["ttft_ms"]["mean"]),
                 "rps_error": err(rps, measured["achieved_rps"])}
        report["levels"].append(level)
        (args.out / "costmodel_gpu.json").write_text(json.dumps(report, indent=1))
        rows.append(level)
    print(f"calibration: {json.dumps(cal)}")
    print(f"tune's choice: {json.dumps(slo)}")
    print("load   rps    | TPOT p99 meas/sim (err) | TPOT mean meas/sim | "
          "TTFT p99 meas/sim (err) | TTFT mean meas/sim | achieved rps")
    for lv in rows:
        m, sim = lv["measured"], lv["simulated"]
        print(f"{lv['load']:.2f} {lv['rps']:7.2f} | "
              f"{m['tpot_ms']['p99']:7.2f}/{sim['tpot_p99_ms']:7.2f} ({lv['tpot_p99_error']:+.1%}) | "
              f"{m['tpot_ms']['mean']:6.2f}/{sim['tpot_ms']:6.2f} | "
              f"{m['ttft_ms']['p99']:7.2f}/{sim['ttft_p99_ms']:7.2f} ({lv['ttft_p99_error']:+.1%}) | "
              f"{m['ttft_ms']['mean']:6.2f}/{sim['ttft_ms']:6.2f} | {m['achieved_rps']}")
        print(f"      steps: {json.dumps(lv['steps'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
