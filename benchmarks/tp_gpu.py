"""Tensor parallelism on two H200s (issue 11): the Llama-3-8B shape at TP=2 against TP=1.

Needs the `nvidia-h200-x2` device. Makes the 8B-shaped checkpoint with random weights on
the device (benchmarks/build_8b.py), builds it with `dwc build -t h200x2-fp8` (no draft;
the bundle's KV plan is one rank's), and measures in one run, for TP=1 and TP=2 on the
same bundle:

- decode at batch 1 and 8 (128-token prompts, 256 new tokens, greedy, ignore EOS),
  output tok/s, against the limit: weight bytes each GPU reads per token (1/N of them at
  TP=N) over the measured read bandwidth;
- offline throughput, 128 in / 128 out, `--prompts` prompts, output tok/s;
- time to first token of a 1k prompt.

With `--bf16`, the same for the bf16 checkpoint itself. NCCL runs with NVLink multicast
off (NCCL_NVLS_ENABLE=0, set by the runtime). `--no-graphs` measures without CUDA graphs
(in case capturing NCCL collectives fails on the device's stack).

    DWC_COMMIT=<hash> python3 benchmarks/tp_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from perf_gpu import (COMPILES_WHILE_TIMING, build, bytes_per_token, prepare_8b,  # noqa: E402
                      prompts, read_bandwidth, tok_s, ttft_ms)

from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.fusion import DEFAULT_PLAN  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402

TARGET = "h200x2-fp8"


def measure(engine: Engine, tp: int, limit_tok_s: float, n_prompts: int) -> dict:
    """Decode at batch 1 and 8, offline throughput and TTFT of one engine."""
    engine.generate(prompts(2, 32, seed=98), SamplingParams(max_tokens=8, ignore_eos=True))
    out = {"tensor_parallel": tp}
    for batch in (1, 8):
        engine.generate(prompts(batch, 128, seed=99), SamplingParams(max_tokens=4,
                                                                     ignore_eos=True))
        rate = tok_s(engine, prompts(batch, 128), 256, f"decode_bs{batch}_tp{tp}")
        out[f"decode_bs{batch}_tok_s"] = rate
        out[f"decode_bs{batch}_step_ms"] = round(1000 * batch / rate, 3)
    out["decode_bs1_limit_tok_s"] = round(limit_tok_s * tp, 1)  # each GPU reads 1/tp
    out["decode_bs1_fraction_of_limit"] = round(out["decode_bs1_tok_s"] /
                                                out["decode_bs1_limit_tok_s"], 3)
    out["throughput_128_128_tok_s"] = tok_s(engine, prompts(n_prompts, 128, seed=3), 128,
                                            f"throughput_tp{tp}")
    out["ttft_1k_ms"] = ttft_ms(engine, 1024)
    out["num_blocks"] = len(engine.blocks.blocks)
    out["peak_memory_gb_rank0"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def run_pair(make, name: str, limit: float, args, results: dict, save) -> None:
    """TP=1 then TP=2 of one model; each engine is closed before the next starts. A run
    that fails is recorded with its error (and the results so far saved), not lost."""
    for tp in (1, 2):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            engine = make(tp)
            try:
                results[f"{name}_tp{tp}"] = measure(engine, tp, limit, args.prompts)
            except BaseException:
                engine.close(force=True)  # workers may be stuck in a collective
                raise
            engine.close()
            del engine
        except Exception as e:  # e.g. NCCL inside CUDA graphs: rerun with --no-graphs
            results[f"{name}_tp{tp}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        save()
    one, two = results[f"{name}_tp1"], results[f"{name}_tp2"]
    if "error" not in one and "error" not in two:
        results[f"{name}_speedup"] = {k: round(two[k] / one[k], 3) for k in
                                      ("decode_bs1_tok_s", "decode_bs8_tok_s",
                                       "throughput_128_128_tok_s")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-tp"))
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--bf16", action="store_true", help="also the bf16 checkpoint")
    ap.add_argument("--no-graphs", action="store_true", help="measure without CUDA graphs")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs two GPUs (nvidia-h200-x2); {torch.cuda.device_count()} visible")
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "llama3-8b-shape"
    report = {"benchmark": "tp_gpu", "device": f"2 x {torch.cuda.get_device_name(0)}",
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "torch": torch.__version__, "cuda_graphs": not args.no_graphs, "results": {}}
    bandwidth = read_bandwidth()
    report["read_bandwidth_gbs"] = round(bandwidth / 1e9, 1)
    build_file = prepare_8b(ckpt, report)
    bundle = args.work / "bundle-tp2-fp8"
    if not (bundle / "manifest.json").exists():  # a warm device keeps the last build
        report["build_seconds"] = build(build_file, TARGET, bundle)
    res = report["results"]
    graphs = not args.no_graphs

    def save():
        report["triton_compiles_while_timing"] = COMPILES_WHILE_TIMING
        (args.out / "tp_gpu.json").write_text(json.dumps(report, indent=1))

    run_pair(lambda tp: Engine.from_bundle(
        bundle, EngineConfig.from_plan(json.loads((bundle / "manifest.json").read_text())
                                       ["kv_cache"], cuda_graphs=graphs),
        tensor_parallel=tp), "fp8", bandwidth / bytes_per_token(bundle / "model"), args, res,
        save)
    if args.bf16:
        run_pair(lambda tp: Engine(ckpt, EngineConfig(num_blocks=4096, max_num_seqs=128,
                                                      max_num_batched_tokens=8192,
                                                      cuda_graphs=graphs, tensor_parallel=tp),
                                   fusion=DEFAULT_PLAN),
                 "bf16", bandwidth / bytes_per_token(ckpt), args, res, save)
    print(f"\n{report['device']}: read bandwidth {report['read_bandwidth_gbs']} GB/s per GPU")
    cols = ("decode_bs1_tok_s", "decode_bs1_limit_tok_s", "decode_bs8_tok_s",
            "throughput_128_128_tok_s", "ttft_1k_ms")
    print(f"{'run':<10}" + "".join(f"{c:>26}" for c in cols))
    for key, r in res.items():
        if "error" in r:
            print(f"{key:<10} failed: {r['error'][:200]}")
        else:
            print(f"{key:<10}" + "".join(f"{r.get(c, '-'):>26}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
