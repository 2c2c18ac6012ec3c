"""Decode-step projections of the 8B shape: which kernel and tiles read the weights fastest.

For each projection shape (fused QKV, o_proj, fused gate/up, down_proj) at 1 and 16
tokens, times the split-K skinny GEMM (dwc/runtime/kernels/skinny_gemm_triton.py) over a
sweep of tiles, against cuBLAS (bf16 `torch.mm`; the older unsplit FP8 weight-only kernel
it was also compared with is gone, 802469d). Each timing replays a CUDA graph of calls over enough weight
copies (>= 256 MB) that no call finds its weight in the 50 MB L2, as in a real step.
Checks the best configuration against a float64 reference.

    DWC_COMMIT=<hash> python3 benchmarks/gemv_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from datetime import date
from pathlib import Path

import torch

from dwc.runtime.kernels.skinny_gemm_triton import skinny_gemm

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}
TILES = [(bn, bk, split, w, f16) for bn, bk, split, w, f16 in itertools.product(
    (64, 128, 256), (64, 128, 256), (1, 2, 4), (4, 8), (False, True))]


def gbs(fn, weights: list, x: torch.Tensor, nbytes: int) -> float:
    """GB/s of fn(x, w) over the weight copies, replayed in a CUDA graph."""
    for w in weights[:2]:
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / (10 * len(weights))
    return round(nbytes / seconds / 1e9, 1)


def study(dtype: str, name: str, m: int) -> dict:
    n, k = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    item = 1 if dtype == "fp8" else 2
    copies = max(2, -(-(256 << 20) // (n * k * item)))
    weights = []
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
        weights.append(w.to(torch.float8_e4m3fn) if dtype == "fp8" else w)
    scale = torch.rand(n, device="cuda", generator=g) + 0.5 if dtype == "fp8" else None
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    nbytes = n * k * item
    row = {"dtype": dtype, "shape": name, "n": n, "k": k, "tokens": m, "tiles": {}}
    for bn, bk, split, warps, f16 in TILES:
        if k // split < bk or (f16 and dtype != "fp8"):
            continue
        try:
            rate = gbs(lambda x_, w_: skinny_gemm(x_, w_, scale, bn, bk, split, warps,
                                                  f16=f16), weights, x, nbytes)
        except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory)
            rate = f"failed: {type(e).__name__}"
        row["tiles"][f"{bn}x{bk}/{split}/{warps}/{int(f16)}"] = rate
    ok = {t: r for t, r in row["tiles"].items() if isinstance(r, float)}
    best = max(ok, key=ok.get)
    row["best"], row["best_gbs"] = best, ok[best]
    if dtype != "fp8":
        row["cublas_gbs"] = gbs(lambda x_, w_: x_ @ w_.t(), weights, x, nbytes)
    bn, bk, split, warps, f16 = (int(v) for v in best.replace("x", "/").split("/"))
    got = skinny_gemm(x, weights[0], scale, bn, bk, split, warps, f16=bool(f16)).double()
    ref = x.double() @ (weights[0].double() * (scale.double()[:, None] if scale is not None
                                                else 1)).t()
    row["max_rel_err"] = float(((got - ref).abs().max() / ref.abs().max()).item())
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "gemv_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "rows": []}
    for dtype, name, m in itertools.product(("fp8", "bf16"), SHAPES, (1,)):
        report["rows"].append(study(dtype, name, m))
        (args.out / "gemv_gpu.json").write_text(json.dumps(report, indent=1))
        r = report["rows"][-1]
        ref = r.get("cublas_gbs", "-")
        print(f"{dtype:<5}{name:<8}m={m:<3} best {r['best']:<12}{r['best_gbs']:>8} GB/s"
              f"   cuBLAS {ref:>8}   err {r['max_rel_err']:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
