"""GGUF bundles on this machine's CPU (issue 7): builds the example for cpu-gguf-f16,
cpu-gguf-q8_0 and cpu-gguf-q4_k_m (and Q4_K_M without the imatrix), and runs `dwc bench`
on each: llama.cpp's prompt and generation tok/s against transformers with the original
model, same prompts, same run; with each bundle's measured quality.

    python3 benchmarks/gguf_cpu.py --out benchmarks/results   # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "stdlib-coder"
RUNS = [("cpu-gguf-f16", []), ("cpu-gguf-q8_0", []), ("cpu-gguf-q4_k_m", []),
        ("cpu-gguf-q4_k_m", ["--set", "gguf-export.imatrix=false"])]


def dwc(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dwc", *map(str, args), "--json"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"dwc {' '.join(map(str, args))} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = {"benchmark": "gguf_cpu", "date": date.today().isoformat(), "commit": commit,
              "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "model": "examples/stdlib-coder (5.2M-parameter Llama)", "results": {}}
    work = Path(tempfile.mkdtemp(prefix="dwc-gguf-bench-"))
    for target, sets in RUNS:
        name = target + ("-no-imatrix" if sets else "")
        bundle = work / name
        dwc("build", EXAMPLE / "model.yaml", "-t", target, "-o", bundle, *sets)
        manifest = json.loads((bundle / "manifest.json").read_text())
        bench = dwc("bench", bundle, "--num-prompts", args.num_prompts, "--input-len", 128,
                    "--output-len", 64)
        q = manifest["quality"]
        report["results"][name] = {
            "file_bytes": manifest["quantization"]["weight_bytes"],
            "perplexity": q["optimized"], "baseline_perplexity": q["baseline"],
            "delta_pct": q["delta_pct"], "kl_divergence": q["kl_divergence"],
            "prompt_tok_s": bench["prompt_tok_s"], "generation_tok_s": bench["generation_tok_s"],
            "transformers": bench.get("transformers")}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-{report['date']}-gguf.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"{'bundle':<26}{'MB':>7}{'ppl':>9}{'delta%':>8}{'pp tok/s':>10}{'tg tok/s':>10}"
          f"{'HF pp':>9}{'HF tg':>8}")
    for name, r in report["results"].items():
        t = r["transformers"] or {}
        print(f"{name:<26}{r['file_bytes'] / 1e6:>7.2f}{r['perplexity']:>9.2f}"
              f"{r['delta_pct']:>8.3f}{r['prompt_tok_s']:>10}{r['generation_tok_s']:>10}"
              f"{t.get('prompt_tok_s', '-'):>9}{t.get('generation_tok_s', '-'):>8}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
