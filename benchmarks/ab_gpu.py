"""A/B of the runtime's kernels on one device, in one call: this tree against a baseline.

The baseline is the same engine with earlier kernels swapped in before its graphs are
captured: `--baseline-kernels FILE` is an older dwc/runtime/kernels/fused_triton.py
(`git show <commit>:dwc/runtime/kernels/fused_triton.py > .ab/fused_triton.py`, carried
to the device), whose rotary + KV write, norm and SwiGLU kernels replace this tree's, with
no FP8 output from the norm / SwiGLU kernels (each FP8 GEMM quantizes its own input) and
the decode attention unsplit. Everything else is the same code, bundle and machine, so
the ratios are the changes' own.

Measured for each, on the 8B shape built by `dwc build -t h200-fp8` (no draft):
offline throughput at 128/128 (2,000 prompts), 2048/128 and 1000/1000 (256 prompts
each), one 4 x 2048-token prefill step (sync, median of 3), and decode steps alone at 128
and 8k tokens of context (batch 1, 8, 32).

    DWC_COMMIT=<hash> python3 benchmarks/ab_gpu.py --baseline-kernels .ab/fused_triton.py \
        --baseline-commit <commit> --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
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

from perf_gpu import build, prepare_8b, prompts  # noqa: E402
from throughput_gpu import decode_only, offline  # noqa: E402

from dwc.runtime import model as model_mod  # noqa: E402
from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.kernels import paged_attention_triton  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402

POINTS = {"128/128": (128, 128, 2000), "2048/128": (2048, 128, 256),
          "1000/1000": (1000, 1000, 256)}
CONTEXTS = ((1, 128), (1, 8000), (8, 128), (8, 8000), (32, 8000))


def use_baseline(path: Path):
    """Swap the baseline's kernels in for engines made from now on; returns the undo."""
    spec = importlib.util.spec_from_file_location("baseline_fused", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    fuse, split_for = model_mod.Decoder.fuse, paged_attention_triton.split_for

    def baseline_fuse(self, plan):
        fuse(self, plan)
        if self.device == "cuda":
            self.add_rms_norm = old.add_rms_norm if plan.get("norm_residual") else self.add_rms_norm
            self.silu_mul = old.silu_mul if plan.get("silu_mul") else self.silu_mul
            self.rope_kv = old.rope_kv if self.rope_kv is not None else None
            self.fp8_norm_out = self.fp8_silu_out = False

    model_mod.Decoder.fuse = baseline_fuse
    paged_attention_triton.split_for = lambda pairs, device: 1

    def undo():
        model_mod.Decoder.fuse = fuse
        paged_attention_triton.split_for = split_for
    return undo


def prefill_step_ms(engine: Engine, n: int = 4, length: int = 2048) -> float:
    """One step prefilling n prompts of `length` tokens, synchronous, median of 3."""
    engine.set_overlap(False)
    params = SamplingParams(max_tokens=1)
    engine.generate(prompts(n, length, seed=41), params)
    times = []
    for i in range(3):
        for p in prompts(n, length, seed=42 + i):
            engine.add(p, params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        while engine.has_work():
            engine.step()
    engine.set_overlap(True)
    return round(statistics.median(times) * 1e3, 2)


def measure(bundle: Path, num_blocks: int | None) -> dict:
    plan = json.loads((bundle / "manifest.json").read_text())["kv_cache"]
    more = {"num_blocks": num_blocks} if num_blocks else {}
    t0 = time.perf_counter()
    engine = Engine.from_bundle(bundle, EngineConfig.from_plan(plan, max_num_seqs=512, **more))
    out = {"load_seconds": round(time.perf_counter() - t0, 1)}
    offline(engine, 128, 128, 600, seed=5)  # warm: pinned pools, shapes
    for name, (n_in, n_out, n) in POINTS.items():
        out[name] = offline(engine, n_in, n_out, n, seed=n_in)["output_tok_s"]
    out["prefill_4x2048_ms"] = prefill_step_ms(engine)
    for batch, ctx in CONTEXTS:
        out[f"decode bs{batch} c{ctx}"] = decode_only(engine, batch, ctx)
    engine.release()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--baseline-kernels", type=Path, required=True)
    ap.add_argument("--baseline-commit", default="?")
    ap.add_argument("--num-blocks", type=int, help="KV blocks (the h200 plan's overfill an H100)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "ab_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "baseline_commit": args.baseline_commit, "torch": torch.__version__}
    save = lambda: (args.out / "ab_gpu.json").write_text(json.dumps(report, indent=1))  # noqa: E731,E501
    build_file = prepare_8b(args.work / "llama3-8b-shape", report)
    bundle = args.work / "bundle-fp8"
    if not (bundle / "manifest.json").exists():
        build_file.write_text(build_file.read_text() + "passes: {tune: {calibrate: false}}\n")
        report["build_fp8_seconds"] = build(build_file, "h200-fp8", bundle)
    undo = use_baseline(args.baseline_kernels)
    report["baseline"] = measure(bundle, args.num_blocks)
    undo()
    save()
    report["this"] = measure(bundle, args.num_blocks)
    save()
    print(f"\n{report['device']}: {report['commit']} against {report['baseline_commit']}")
    print(f"{'':<24}{'baseline':>10}{'this':>10}{'ratio':>8}")
    for key, base in report["baseline"].items():
        new = report["this"][key]
        better = base / new if key.endswith("_ms") or key.endswith("seconds") else new / base
        print(f"{key:<24}{base:>10}{new:>10}{better:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
