"""llama.cpp's CPU weight repacking on and off (issue 17), on this machine's CPU: builds the
example for cpu-gguf-f16, cpu-gguf-q8_0 and cpu-gguf-q4_k_m, then times llama.cpp on each
bundle's file with `use_extra_bufts` true and false (what llama-server's `--repack` /
`--no-repack` switch), batch 1, the same random prompts as `dwc bench`, alternating the two
settings `--repeats` times. The machine is shared: each setting's best run (highest
tok/s, the least disturbed) is the figure; the medians and every run are kept in the
JSON. Also records how many tensors llama.cpp repacked (its load log): on x86 it repacks
Q4_0 / Q4_K / IQ4_NL, never Q8_0.

    .venv/bin/python benchmarks/gguf_repack_cpu.py --out benchmarks/results  # ~3 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "stdlib-coder"
TARGETS = ("cpu-gguf-f16", "cpu-gguf-q8_0", "cpu-gguf-q4_k_m")
sys.path.insert(0, str(ROOT / "benchmarks"))


def repacked_tensors(path: Path) -> int:
    """How many tensors llama.cpp repacks when loading `path` (from its own log)."""
    code = ("import sys; from llama_cpp import Llama; "
            "Llama(model_path=sys.argv[1], n_ctx=64, verbose=True)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    return sum(1 for line in proc.stderr.splitlines() if line.startswith("repack: repack tensor"))


def measure(path: Path, repack: bool, args) -> dict:
    from dwc.backends.gguf import child as gguf_child
    from dwc.backends.gguf.bench import llama_bench

    _, prompt_s, gen_s = gguf_child.run("benchmarking", path, llama_bench, path, args.num_prompts,
                                        args.input_len, args.output_len, 0, None, repack)
    return {"prompt_tok_s": args.num_prompts * args.input_len / prompt_s,
            "generation_tok_s": args.num_prompts * (args.output_len - 1) / gen_s}


def main() -> int:
    from soak_cpu import cpu

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    report = {"benchmark": "gguf_repack_cpu", "date": date.today().isoformat(), "commit": commit,
              "device": cpu(), "model": "examples/stdlib-coder (5.2M-parameter Llama)",
              "settings": vars(args) | {"out": str(args.out)}, "results": {}}
    work = Path(tempfile.mkdtemp(prefix="dwc-repack-bench-"))
    for target in TARGETS:
        bundle = work / target
        proc = subprocess.run([sys.executable, "-m", "dwc", "build", str(EXAMPLE / "model.yaml"),
                               "-t", target, "-o", str(bundle)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"dwc build -t {target} failed: {proc.stderr[-2000:]}")
        path = bundle / "model" / "model.gguf"
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for repack in (True, False):
                runs[repack].append(measure(path, repack, args))
        row = {"repacked_tensors": repacked_tensors(path)}
        for repack, name in ((True, "repack"), (False, "no_repack")):
            keys = ("prompt_tok_s", "generation_tok_s")
            row[name] = {k: round(max(r[k] for r in runs[repack]), 1) for k in keys}
            row[name + "_median"] = {k: round(statistics.median(r[k] for r in runs[repack]), 1)
                                     for k in keys}
            row[name + "_runs"] = [{k: round(r[k], 1) for k in keys} for r in runs[repack]]
        for k in ("prompt_tok_s", "generation_tok_s"):
            row[f"no_repack_vs_repack_{k}"] = round(row["no_repack"][k] / row["repack"][k], 3)
        report["results"][target] = row
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"cpu-{report['date']}-gguf-repack.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'bundle':<18}{'repacked':>9}{'pp on':>9}{'pp off':>9}{'tg on':>8}{'tg off':>8}")
    for target, r in report["results"].items():
        print(f"{target:<18}{r['repacked_tensors']:>9}{r['repack']['prompt_tok_s']:>9}"
              f"{r['no_repack']['prompt_tok_s']:>9}{r['repack']['generation_tok_s']:>8}"
              f"{r['no_repack']['generation_tok_s']:>8}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
