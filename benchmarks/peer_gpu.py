"""dwc against the pure-PyTorch peer, gpt-fast, in one device call (issue 18).

Runs the peer's own benchmark (`gptfast_bench.py` beside gpt-fast, copied from
../shared/peers into an ignored folder that travels with `carry`: bf16 and its int8
weight-only scheme, Llama-3-8B shape, random weights, 128-token prompt, 128 new tokens,
greedy, batch 1 / 8 / 32), then dwc on the same shape and the same settings: the bf16
checkpoint through `Engine` (fusion plan applied, as a bundle would) and, when `--fp8`
names an h200-fp8 bundle of it, that bundle. Prints the ratios dwc / peer.

    python3 benchmarks/peer_gpu.py --peers .peers --out $OUT [--fp8 /tmp/dwc-perf/bundle-fp8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from perf_gpu import prompts, tok_s  # noqa: E402

from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.fusion import DEFAULT_PLAN  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402

BATCHES = (1, 8, 32)


def dwc_decode(engine: Engine) -> dict:
    out = {}
    engine.generate(prompts(2, 32, seed=98), SamplingParams(max_tokens=8, ignore_eos=True))
    for batch in BATCHES:
        engine.generate(prompts(batch, 128, seed=99), SamplingParams(max_tokens=4))
        out[f"bs{batch}"] = tok_s(engine, prompts(batch, 128, seed=batch), 128)
    return out


def run_peer(args, save, report) -> dict:
    """gpt-fast's own script: its result lines ("bf16 8 5.84 ms/step 1368 tok/s") kept as
    they come, its json when it finishes within --peer-timeout."""
    peer = {}
    proc = subprocess.Popen([sys.executable, str(args.peers / "gptfast_bench.py"),
                             str(args.peers / "gpt-fast"), str(args.out)],
                            stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(args.peer_timeout, proc.kill)  # its compiles print nothing
    timer.start()
    for line in proc.stdout:
        parts = line.split()
        if len(parts) == 6 and parts[3] == "ms/step":
            peer[f"{parts[0]}_bs{parts[1]}"] = {"step_ms": float(parts[2]),
                                                "tok_s": float(parts[4])}
            report["gpt_fast"] = peer
            save()
    timer.cancel()
    if proc.wait() != 0:
        peer["unfinished"] = f"exit {proc.returncode} (killed after --peer-timeout " \
            f"{args.peer_timeout:.0f} s if negative)"
        return peer
    return json.loads((args.out / "gptfast.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=Path, default=ROOT / ".peers")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--fp8", type=Path, help="an h200-fp8 bundle of the 8B shape")
    ap.add_argument("--peer-timeout", type=float, default=420.0,
                    help="seconds the peer may take (its compiles are minutes)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from build_8b import make_checkpoint

    ckpt = args.work / "llama3-8b-shape"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt)
    report = {"benchmark": "peer_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "settings": "Llama-3-8B shape, random weights, 128 in / 128 out, greedy",
              "gpt_fast": {}, "dwc": {}}
    save = lambda: (args.out / "peer_gpu.json").write_text(json.dumps(report, indent=1))  # noqa: E731,E501
    # dwc first (a minute), then the peer, whose compiles take minutes: a call that ends
    # inside them keeps dwc's figures and the peer's lines printed so far.
    bf16 = Engine(ckpt, EngineConfig(num_blocks=4096, max_num_seqs=64,
                                     max_num_batched_tokens=8192), fusion=DEFAULT_PLAN)
    report["dwc"]["bf16"] = dwc_decode(bf16)
    bf16.release()  # its graphs and cache go before the next engine plans its blocks
    del bf16
    if args.fp8:  # the same KV size as the bf16 engine's (a bundle's plan fills the GPU)
        plan = json.loads((args.fp8 / "manifest.json").read_text())["kv_cache"]
        fp8 = Engine.from_bundle(args.fp8, EngineConfig.from_plan(plan, num_blocks=4096,
                                                                  max_num_seqs=64))
        report["dwc"]["fp8"] = dwc_decode(fp8)
        fp8.release()  # the peer needs the GPU next
        del fp8
    save()
    report["gpt_fast"] = peer = run_peer(args, save, report)
    (args.out / "peer_gpu.json").write_text(json.dumps(report, indent=1))
    print(f"\n{report['device']} @ {report['commit']}: {report['settings']}")
    print(f"{'':<10}" + "".join(f"{'bs' + str(b):>24}" for b in BATCHES))
    for ours, theirs in (("bf16", "bf16"), ("fp8", "int8wo")):
        if ours not in report["dwc"]:
            continue
        cells = []
        for b in BATCHES:
            d = report["dwc"][ours][f"bs{b}"]
            p = peer.get(f"{theirs}_bs{b}", {}).get("tok_s")
            cells.append(f"{d:.0f} / {p:.0f} = {d / p:.2f}x" if p else f"{d:.0f} / -")
        print(f"{ours + '/' + theirs:<10}" + "".join(f"{c:>24}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
