"""The attention kernels alone, 8B shape (32 heads, 8 KV heads, head_dim 128, 16-token
blocks, shuffled block tables), bf16 and FP8 caches.

- Prefill: the paged prefill kernel (one launch for every prompt chunk of a step,
  dwc/runtime/kernels/paged_prefill_triton.py) against the PyTorch path it replaced on
  the GPU (the cache gathered into padded [B, L] batches, SDPA, the output scattered
  back: layers/attention.py prompt_attention), TFLOP/s of the causal attention's work.
- Decode: the paged decode kernel (paged_attention_triton.py) at batch x context, GB/s
  of K/V read, the default tiles and split against the unsplit kernel and a sweep
  (tiles and splits); the best per point is printed.

Each case is checked against the PyTorch reference before it is timed.

    DWC_COMMIT=<hash> python3 benchmarks/attention_gpu.py --out $OUT [--decode-only]
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
from triton.testing import do_bench

from dwc.runtime.layers.attention import prompt_attention
from dwc.runtime.kernels.paged_attention_triton import _tiles, paged_decode, split_for
from dwc.runtime.kernels.paged_prefill_triton import paged_prefill
from dwc.runtime.kernels.prefill_tiles import PrefillGroup, block_q_for, tile_table

HEADS, KV_HEADS, D, PAGE = 32, 8, 128, 16
PREFILL = {"4 x 2048": [(0, 2048)] * 4, "1 x 8192": [(0, 8192)], "1 x 1024": [(0, 1024)],
           "16 x 512": [(0, 512)] * 16, "piece 2048 at 4096": [(4096, 2048)]}
DECODE = [(b, c) for b in (1, 32, 128, 256, 512) for c in (128, 1024, 2048)] + \
    [(1, 8192), (8, 8192), (32, 8192)]
SWEEP = list(itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)))  # with the default split
SPLITS = (1, 2, 4, 8, 16, 32)
# Prefill: (rows per program, BLOCK_N, warps, stages); rows = queries x the GQA group.
PREFILL_SWEEP = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))
SCALES = (0.02, 0.01)


def cache_for(tokens: list[int], fp8: bool, gen):
    blocks = sum(-(-n // PAGE) for n in tokens)
    cache = torch.randn(2, blocks * PAGE, KV_HEADS, D, device="cuda", generator=gen,
                        dtype=torch.bfloat16)
    if fp8:
        cache = cache.clamp(-448, 448).to(torch.float8_e4m3fn)
    perm = torch.randperm(blocks, device="cuda", generator=gen).tolist()
    tables, used = [], 0
    for n in tokens:
        tables.append(perm[used:used + -(-n // PAGE)])
        used += len(tables[-1])
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                           device="cuda")
    return cache, tables, table_t


def prefill_case(spans, fp8: bool, gen, sweep: bool) -> dict:
    cache, tables, table_t = cache_for([s + n for s, n in spans], fp8, gen)
    scales = SCALES if fp8 else (1.0, 1.0)
    chunks, row = [], 0
    for start, n in spans:
        chunks.append((row, n, start))
        row += n
    q = torch.randn(row, HEADS, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(q)

    def group(block_q):
        return PrefillGroup(torch.tensor(tile_table(chunks, block_q), dtype=torch.int32,
                                         device="cuda"),
                            torch.tensor(chunks, dtype=torch.int32, device="cuda"), table_t,
                            PAGE, block_q)

    default = group(block_q_for(q.dtype, D, HEADS // KV_HEADS))
    kernel = lambda: paged_prefill(q, cache, default, D ** -0.5, scales, out)  # noqa: E731
    flops = sum(4 * n * (s + (n + 1) / 2) * D * HEADS for s, n in spans)
    tflops = lambda ms: round(flops / ms / 1e9, 1)  # noqa: E731
    report = {"tokens": row, "kernel_ms": round(do_bench(kernel), 3)}
    report["kernel_tflops"] = tflops(report["kernel_ms"])
    if all(s == 0 for s, _ in spans) and len({n for _, n in spans}) == 1:
        n = spans[0][1]  # the replaced path: same-length whole prompts, no padding
        slots = torch.tensor([[t[p // PAGE] * PAGE + p % PAGE for p in range(n)]
                              for t in tables], device="cuda")
        gather = torch.arange(row, device="cuda").view(len(spans), n)
        flat = torch.arange(row, device="cuda")

        def old():
            out[flat] = prompt_attention(q[gather], cache, slots, flat, D ** -0.5, scales)

        want = prompt_attention(q[gather], cache, slots, flat, D ** -0.5, scales)
        kernel()
        report["max_abs_err_vs_sdpa"] = float((out.float() - want.float()).abs().max())
        assert report["max_abs_err_vs_sdpa"] < 3e-2, report
        report["sdpa_path_ms"] = round(do_bench(old), 3)
        report["sdpa_path_tflops"] = tflops(report["sdpa_path_ms"])
        report["speedup"] = round(report["sdpa_path_ms"] / report["kernel_ms"], 2)
        if sweep:
            report["sweep"] = {}
            for rows, *cfg in PREFILL_SWEEP:
                g = group(rows // (HEADS // KV_HEADS))
                name = "/".join(map(str, (rows, *cfg)))
                try:
                    run = lambda: paged_prefill(q, cache, g, D ** -0.5, scales, out, cfg)  # noqa: E731,E501
                    run()
                    assert (out.float() - want.float()).abs().max() < 3e-2
                    report["sweep"][name] = tflops(do_bench(run))
                except Exception as e:  # noqa: BLE001 - a config that does not fit
                    report["sweep"][name] = f"failed: {type(e).__name__}"
            ok = {k: v for k, v in report["sweep"].items() if isinstance(v, float)}
            report["best"] = max(ok, key=ok.get)
            report["best_tflops"] = ok[report["best"]]
    return report


def decode_case(batch: int, context: int, fp8: bool, gen, sweep: bool) -> dict:
    cache, _, table_t = cache_for([context] * batch, fp8, gen)
    scales = SCALES if fp8 else (1.0, 1.0)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    nbytes = 2 * batch * context * KV_HEADS * D * cache.element_size()
    run = lambda cfg: lambda: paged_decode(q, cache, table_t, lens, PAGE, D ** -0.5, scales,  # noqa: E731
                                           config=cfg)
    want = run(None)()
    split = split_for(batch * KV_HEADS, q.device)
    unsplit = (*_tiles(q.dtype, D, batch * KV_HEADS, fp8), 1)
    report = {"default_gbs": round(nbytes / do_bench(run(None)) / 1e6, 1), "split": split,
              "unsplit_gbs": round(nbytes / do_bench(run(unsplit)) / 1e6, 1), "sweep": {}}
    tiles = _tiles(q.dtype, D, batch * KV_HEADS, fp8, split > 1)
    configs = [(*c, split) for c in SWEEP] + [(*tiles, sp) for sp in SPLITS]
    for cfg in configs if sweep else ():
        try:
            got = run(cfg)()
            assert (got.float() - want.float()).abs().max() < 2e-2
            report["sweep"]["/".join(map(str, cfg))] = round(nbytes / do_bench(run(cfg)) / 1e6, 1)
        except Exception as e:  # noqa: BLE001 - a config that does not fit
            report["sweep"]["/".join(map(str, cfg))] = f"failed: {type(e).__name__}"
    ok = {k: v for k, v in report["sweep"].items() if isinstance(v, float)}
    if ok:
        report["best"] = max(ok, key=ok.get)
        report["best_gbs"] = ok[report["best"]]
    return report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--decode-only", action="store_true")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    report = {"benchmark": "attention_gpu", "device": torch.cuda.get_device_name(),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "torch": torch.__version__, "prefill": {}, "decode": {}}
    for fp8 in (True, False):
        kv = "fp8" if fp8 else "bf16"
        for name, spans in {} if args.decode_only else PREFILL.items():
            report["prefill"][f"{kv} {name}"] = prefill_case(
                spans, fp8, gen, sweep=name in ("4 x 2048", "1 x 8192"))
        for batch, context in DECODE:
            sweep = fp8 and (batch, context) in ((1, 8192), (8, 8192), (32, 2048), (256, 2048),
                                                 (512, 2048))
            report["decode"][f"{kv} b{batch} c{context}"] = decode_case(batch, context, fp8,
                                                                        gen, sweep)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_gpu.json").write_text(json.dumps(report, indent=1))
    print(f"{'prefill':24} {'kernel ms':>10} {'TFLOP/s':>8} {'SDPA path ms':>13} {'x':>5} "
          f"{'best':>6} {'tiles':>14}")
    for name, r in report["prefill"].items():
        print(f"{name:24} {r['kernel_ms']:10.3f} {r['kernel_tflops']:8.1f} "
              f"{r.get('sdpa_path_ms', '-'):>13} {r.get('speedup', '-'):>5} "
              f"{r.get('best_tflops', '-'):>6} {r.get('best', '-'):>14}")
    print(f"{'decode':20} {'split':>5} {'GB/s':>8} {'unsplit':>8} {'best GB/s':>10} "
          f"{'best tiles':>14}")
    for name, r in report["decode"].items():
        print(f"{name:20} {r['split']:>5} {r['default_gbs']:8.1f} {r['unsplit_gbs']:8.1f} "
              f"{r.get('best_gbs', '-'):>10} {r.get('best', '-'):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
