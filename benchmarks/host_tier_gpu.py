"""Issue 23's host-memory KV tier on the GPU: multi-turn conversations over long shared
contexts, more than the GPU's prefix cache holds, with the tier on and off.

The 8B shape built by `dwc build -t h200-fp8` (perf_gpu.py), its KV cache cut to
`--gpu-contexts` contexts' worth of blocks so that the conversations' contexts cannot all
stay on the GPU. Each of `--conversations` conversations has its own context of
`--context` tokens; turn t's prompt is the context, the earlier turns' questions and
answers, and a new question. Turns go round the conversations (every conversation's turn
1, then every turn 2, ...), so a conversation's context has left the GPU by its next
turn. Each request runs alone (one token: its TTFT, wall time to the first token with
the GPU synchronised). Reported per configuration: TTFT p50 / p99 of turn 1 (misses
everywhere) and of the later turns (hits in the tier when it is on), the tier's counters,
and the offline throughput of requests that share nothing (the tier's cost on misses:
its copies out).

    DWC_COMMIT=<hash> python3 benchmarks/host_tier_gpu.py --out $OUT [--conversations 32]
"""

from __future__ import annotations

import argparse
import gc
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

from dwc.model.checkpoint import model_info  # noqa: E402
from dwc.model.kvcache import kv_bytes_per_token  # noqa: E402
from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402


def conversation_prompts(args) -> list[list[list[int]]]:
    """[turn][conversation] prompt ids: context + (question, answer) per earlier turn +
    the new question."""
    contexts = prompts(args.conversations, args.context, seed=1)
    qa = prompts(args.conversations * args.turns, args.question + args.answer, seed=2)
    turns = []
    for t in range(args.turns):
        turn = []
        for c, ctx in enumerate(contexts):
            history = [tok for k in range(t) for tok in qa[c * args.turns + k]]
            question = qa[c * args.turns + t][:args.question]
            turn.append(ctx + history + question)
        turns.append(turn)
    return turns


def ttft(engine: Engine, prompt: list[int]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def summary(values: list[float]) -> dict:
    s = sorted(values)
    return {"n": len(s), "p50_ms": round(statistics.median(s), 2),
            "p99_ms": round(s[min(len(s) - 1, int(0.99 * len(s)))], 2),
            "mean_ms": round(statistics.fmean(s), 2)}


def offline_misses(engine: Engine, args) -> dict:
    """Requests that share nothing, all at once: the tier only copies out."""
    batch = prompts(args.miss_prompts, args.miss_len, seed=7)
    params = SamplingParams(max_tokens=args.miss_out, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate(batch, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"prompts": len(batch), "in": args.miss_len, "out": args.miss_out,
            "seconds": round(seconds, 2),
            "output_tok_s": round(len(batch) * args.miss_out / seconds, 1)}


def run(bundle: Path, plan: dict, num_blocks: int, host_gib: float, args, turns) -> dict:
    engine = Engine.from_bundle(bundle, EngineConfig.from_plan(
        plan, num_blocks=num_blocks, kv_host_gib=host_gib, max_num_seqs=256))
    warm = prompts(2, args.context, seed=99)
    for p in warm:  # the prefill shapes, graphs and kernels, outside the timing
        ttft(engine, p)
    offline_misses_warm = dict(vars(args), miss_prompts=16)
    offline_misses(engine, argparse.Namespace(**offline_misses_warm))
    times = [[ttft(engine, p) for p in turn] for turn in turns]
    result = {"host_gib": host_gib, "num_blocks": num_blocks,
              "turn1": summary(times[0]),
              "later_turns": summary([t for turn in times[1:] for t in turn]),
              "per_turn_p50_ms": [summary(t)["p50_ms"] for t in times],
              "prefix_hit_rate": round(engine.blocks.hits / max(1, engine.blocks.lookups), 3)}
    tier = engine.blocks.tier
    if tier is not None:
        result["tier"] = dict(tier.stats.as_dict(), capacity_blocks=tier.capacity,
                              batch_rows=tier.batch_rows)
    result["misses_offline"] = offline_misses(engine, args)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--context", type=int, default=7424)  # + turns < 8192
    ap.add_argument("--question", type=int, default=64)
    ap.add_argument("--answer", type=int, default=128)
    ap.add_argument("--gpu-contexts", type=float, default=8.0,
                    help="the GPU cache holds this many contexts' blocks")
    ap.add_argument("--miss-prompts", type=int, default=256)
    ap.add_argument("--miss-len", type=int, default=1024)
    ap.add_argument("--miss-out", type=int, default=64)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "host_tier_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "workload": {k: getattr(args, k) for k in (
                  "conversations", "turns", "context", "question", "answer", "gpu_contexts",
                  "miss_prompts", "miss_len", "miss_out")}}
    save = lambda: (args.out / "host_tier_gpu.json").write_text(json.dumps(report, indent=1))  # noqa: E731,E501
    build_file = prepare_8b(args.work / "llama3-8b-shape", report)
    bundle = args.work / "bundle-fp8"
    if not (bundle / "manifest.json").exists():
        build_file.write_text(build_file.read_text() + "passes: {tune: {calibrate: false}}\n")
        report["build_fp8_seconds"] = build(build_file, "h200-fp8", bundle)
    plan = json.loads((bundle / "manifest.json").read_text())["kv_cache"]
    turns = conversation_prompts(args)
    longest = max(len(p) for p in turns[-1])
    page = plan["block_size"]
    num_blocks = int(args.gpu_contexts * -(-longest // page)) + 64
    # the pool holds every conversation's longest prompt
    itemsize = 1 if plan["dtype"] == "fp8_e4m3" else 2
    per_block = kv_bytes_per_token(model_info(bundle / "model"), itemsize) * page
    host_gib = round(1.1 * args.conversations * -(-longest // page) * per_block / (1 << 30), 2)
    report["block_bytes"], report["host_gib"] = per_block, host_gib
    save()
    report["off"] = run(bundle, plan, num_blocks, 0.0, args, turns)
    save()
    report["on"] = run(bundle, plan, num_blocks, host_gib, args, turns)
    off, on = report["off"], report["on"]
    report["later_turn_ttft_p50_off_over_on"] = round(
        off["later_turns"]["p50_ms"] / on["later_turns"]["p50_ms"], 2)
    report["misses_throughput_on_over_off"] = round(
        on["misses_offline"]["output_tok_s"] / off["misses_offline"]["output_tok_s"], 3)
    save()
    print(f"{'':12}{'turn1 p50':>11}{'p99':>9}{'later p50':>11}{'p99':>9}{'hit rate':>10}"
          f"{'miss tok/s':>12}")
    for name in ("off", "on"):
        r = report[name]
        print(f"{name:12}{r['turn1']['p50_ms']:>11}{r['turn1']['p99_ms']:>9}"
              f"{r['later_turns']['p50_ms']:>11}{r['later_turns']['p99_ms']:>9}"
              f"{r['prefix_hit_rate']:>10}{r['misses_offline']['output_tok_s']:>12}")
    print(f"later-turn TTFT p50 off/on {report['later_turn_ttft_p50_off_over_on']}x (goal 3x); "
          f"misses' throughput on/off {report['misses_throughput_on_over_off']} (goal >= 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
