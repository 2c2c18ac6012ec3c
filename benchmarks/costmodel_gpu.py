"""The cost model (dwc/costmodel.py, the `tune` pass) against measurement on the H200
(issue 9): the Llama-3-8B shape (random weights) built `-t h200-fp8` with an SLO, then
`dwc bench`'s online measurement (Poisson arrivals, 512-token prompts, 128 new tokens) at
three loads below the predicted maximum, beside the model's prediction at the same rate.
Goal: predictions within 15% of measurements.

    DWC_COMMIT=<hash> python3 benchmarks/costmodel_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from build_8b import EXAMPLE, make_checkpoint  # noqa: E402

from dwc.bench import BenchConfig, online  # noqa: E402
from dwc.costmodel import Machine, ModelFigures, predict  # noqa: E402
from dwc.runtime.engine import Engine  # noqa: E402

PROMPT, OUTPUT, TPOT_MS = 512, 128, 40.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.8])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "llama3-8b-shape"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt)
    build_file = args.work / "model-slo.yaml"
    build_file.write_text(
        f"name: llama3-8b-shape\nmodel: {ckpt}\n"
        f"calibration: {{data: {EXAMPLE / 'calib.txt'}, samples: 32, seq_len: 256}}\n"
        f"evaluation: {{data: {EXAMPLE / 'eval.txt'}, samples: 8, seq_len: 256, "
        "max_ppl_increase_pct: 100}\ndraft: none\n"
        f"slo: {{target_latency_ms: {TPOT_MS}, prompt_tokens: {PROMPT}, "
        f"output_tokens: {OUTPUT}, max_context: 2048}}\n")
    bundle = args.work / "bundle-fp8-slo"
    proc = subprocess.run([sys.executable, "-m", "dwc", "build", str(build_file), "-t",
                           "h200-fp8", "-o", str(bundle), "--json", "--force"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"build failed: {proc.stderr[-2000:]}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    slo, plan = manifest["slo"], manifest["kv_cache"]
    hw = manifest["target"]["hardware"]
    machine = Machine(hw["memory_bandwidth_gbs"] * 1e9, max(hw["peak_tflops"].values()) * 1e12,
                      hw["usd_per_hour"])
    figures = ModelFigures(manifest["quantization"]["weight_bytes"],
                           manifest["source"]["parameters"], plan["bytes_per_token"])
    engine = Engine.from_bundle(bundle)
    engine.generate([[5] * PROMPT] * 4, None)  # warm-up: prefill shapes, graphs
    report = {"benchmark": "costmodel_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "slo": slo, "max_num_seqs": plan["max_num_seqs"], "levels": []}
    top = slo["predicted"]["max_rps"]
    for load in args.loads:
        rps = round(top * load, 2)
        cfg = BenchConfig(input_len=PROMPT, output_len=OUTPUT, rps=rps,
                          online_requests=max(64, int(rps * 4)))
        measured = online(engine, cfg)
        p = predict(machine, figures, rps, PROMPT, OUTPUT, plan["max_num_seqs"])
        level = {"load": load, "rps": rps, "measured": measured, "predicted": p.as_dict(),
                 "tpot_p99_error": round(p.tpot_p99_ms / measured["tpot_ms"]["p99"] - 1, 3),
                 "ttft_p99_error": round(p.ttft_p99_ms / measured["ttft_ms"]["p99"] - 1, 3),
                 "rps_error": round(rps / measured["achieved_rps"] - 1, 3)}
        report["levels"].append(level)
        (args.out / "costmodel_gpu.json").write_text(json.dumps(report, indent=1))
        print(f"load {load:.2f} rps {rps:>8}: TPOT p99 measured {measured['tpot_ms']['p99']:>8} "
              f"predicted {p.tpot_p99_ms:8.2f} | TTFT p99 measured {measured['ttft_ms']['p99']:>8} "
              f"predicted {p.ttft_p99_ms:8.2f} | achieved rps {measured['achieved_rps']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
