"""The runtime's speed on the H200 against the bandwidth limit and stock PyTorch (issue 6).

Makes a Llama-3-8B-shaped checkpoint with random weights on the device, builds it with
`dwc build -t h200-fp8` (no draft), and measures in one run:

- decode at batch 1, 8, 32, 128 (128-token prompts, 256 new tokens, greedy, ignore EOS):
  dwc bf16 (the checkpoint itself) and dwc FP8 (the bundle), output tok/s;
- the stock-PyTorch baseline: transformers' eager `generate` on the bf16 checkpoint,
  same prompts, batch 1;
- the limit: weight bytes read per decoded token over the measured read bandwidth;
- offline throughput, FP8: `--prompts` prompts of 128 in / 128 out (and a shorter
  1000 / 1000 run);
- TTFT of one 1k and one 8k prompt; peak GPU memory;
- a torch-profiler table of one eager decode step at batch 1 (where the time goes).

    DWC_COMMIT=<hash> python3 benchmarks/perf_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from build_8b import EXAMPLE, make_checkpoint  # noqa: E402

from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.fusion import DEFAULT_PLAN  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402

GOALS = {"decode_bs1_bf16": 250, "decode_bs1_fp8": 465, "decode_bs1_int4_awq": 700,
         "throughput_128_128_fp8": 28000, "throughput_1000_1000_fp8": 18000}


def read_bandwidth() -> float:
    """Bytes/s of a large on-device read (sum over 8 GB), best of 5."""
    x = torch.empty(2 * 1024 ** 3, dtype=torch.float32, device="cuda").fill_(1)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0))
    del x
    torch.cuda.empty_cache()
    return best


def bytes_per_token(model_dir: Path) -> int:
    """Weight bytes a decode step reads: every safetensors byte but the embedding's
    (one row of it is read)."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                if "embed_tokens" in k:
                    continue
                sl = st.get_slice(k)
                total += math.prod(sl.get_shape()) * _itemsize(sl.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "I8": 1, "I16": 2,
            "I32": 4, "I64": 8, "U8": 1}[dtype]


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 4000, (n, length), generator=g).tolist()


def triton_compiles() -> int:
    """Kernels Triton has compiled so far in this machine's cache (a fresh device starts
    empty): a timed run that compiles measures the compiler, and is flagged."""
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return len(list(cache.glob("*/*.cubin"))) if cache.exists() else 0


COMPILES_WHILE_TIMING: list[str] = []


def tok_s(engine: Engine, batch: list, n_out: int, label: str = "") -> float:
    params = SamplingParams(max_tokens=n_out, ignore_eos=True)
    before = triton_compiles()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate(batch, params)
    torch.cuda.synchronize()
    rate = round(len(batch) * n_out / (time.perf_counter() - t0), 1)
    if triton_compiles() != before:
        COMPILES_WHILE_TIMING.append(f"{label}: {triton_compiles() - before}")
    return rate


def ttft_ms(engine: Engine, length: int) -> float:
    p = prompts(1, length, seed=length)
    engine.generate(p, SamplingParams(max_tokens=1))  # warm the shapes
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate(prompts(1, length, seed=length + 1), SamplingParams(max_tokens=1))
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1000, 2)


def hf_baseline(ckpt: Path, batch: list, n_out: int) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor(batch, device="cuda")
    with torch.inference_mode():
        hf.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False,
                    pad_token_id=0, attention_mask=torch.ones_like(ids))
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del hf
    torch.cuda.empty_cache()
    return round(len(batch) * n_out / seconds, 1)


def profile_step(engine: Engine, batch: int = 1) -> list[dict]:
    """Kernel times of eager decode steps at `batch` (graphs hide the breakdown)."""
    from torch.profiler import ProfilerActivity, profile

    seqs = [engine.add(p, SamplingParams(max_tokens=40, ignore_eos=True))
            for p in prompts(batch, 128, seed=7)]
    while any(s.num_computed < 128 for s in seqs):
        engine.step()
    graphs, engine.runner.graphs = engine.runner.graphs, None
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    engine.runner.graphs = graphs
    for seq in seqs:
        engine.abort(seq)
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]:
        rows.append({"name": e.key[:80], "calls_per_step": e.count / 5,
                     "device_us_per_step": round(e.device_time_total / 5, 1)})
    return rows


def replay_ms(engine: Engine, batch: int = 1) -> float | None:
    """GPU time of one decode step at `batch`: its graph replayed back to back (the
    inputs of the last step stay in its buffers). Step time minus this is host time."""
    graphs = engine.runner.graphs
    if graphs is None:
        return None
    seqs = [engine.add(p, SamplingParams(max_tokens=8, ignore_eos=True))
            for p in prompts(batch, 128, seed=5)]
    while any(s.status.value != "finished" for s in seqs):
        engine.step()
    g = graphs.graphs[next(s for s in graphs.sizes if s >= batch)]
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        g.replay()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) / 50 * 1000, 3)


def measure_engine(engine: Engine, name: str, limit: float, results: dict) -> None:
    # Warm-up prompts use other seeds than the timed ones: a shared prefix would be a
    # prefix-cache hit and time a shorter prefill.
    engine.generate(prompts(2, 32, seed=98), SamplingParams(max_tokens=8, ignore_eos=True))
    for batch in (1, 8, 32, 128):
        # Steady state: the prefill shapes of this batch compiled and planned once.
        engine.generate(prompts(batch, 128, seed=99), SamplingParams(max_tokens=4,
                                                                     ignore_eos=True))
        results[f"decode_bs{batch}_{name}"] = {
            "dwc_tok_s": tok_s(engine, prompts(batch, 128), 256, f"decode_bs{batch}_{name}"),
            "limit_tok_s": round(limit * batch, 1) if batch == 1 else None,
            "input": 128, "output": 256}
    for batch in (1, 128):
        r = results[f"decode_bs{batch}_{name}"]
        r["step_ms"] = round(1000 * batch / r["dwc_tok_s"], 3)
        r["gpu_step_ms"] = replay_ms(engine, batch)  # the rest of step_ms is host time


def build(build_file: Path, target: str, out: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dwc", "build", str(build_file), "-t",
                           target, "-o", str(out), "--json"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"build failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return round(time.perf_counter() - t0, 1)


def prepare_8b(ckpt: Path, report: dict) -> Path:
    """The 8B-shaped checkpoint at `ckpt` (made unless a warm device kept it) and a build
    file for it beside it (no draft; a quick calibration); returns the build file."""
    if not (ckpt / "config.json").exists():
        report["checkpoint_seconds"] = round(make_checkpoint(ckpt), 1)
    build_file = ckpt.parent / "model.yaml"
    build_file.write_text(
        f"name: llama3-8b-shape\nmodel: {ckpt}\n"
        f"calibration: {{data: {EXAMPLE / 'calib.txt'}, samples: 32, seq_len: 256}}\n"
        f"evaluation: {{data: {EXAMPLE / 'eval.txt'}, samples: 8, seq_len: 256, "
        "max_ppl_increase_pct: 100}\ndraft: none\n")
    return build_file


def int4_run(args, ckpt: Path, build_file: Path, bandwidth: float, report: dict) -> int:
    """The INT4 AWQ bundle alone (its build takes most of a device call)."""
    bundle = args.work / "bundle-int4"
    if not (bundle / "manifest.json").exists():  # a warm device keeps the last call's build
        report["build_int4_awq_seconds"] = build(build_file, "h100-int4-awq", bundle)
    limit = bandwidth / bytes_per_token(bundle / "model")
    engine = Engine.from_bundle(bundle)
    res = report["results"]
    measure_engine(engine, "int4_awq", limit, res)
    report["profile_bs1_int4_awq_eager"] = profile_step(engine)
    report["peak_memory_gb_int4_awq"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    for key, r in res.items():
        if key in GOALS:
            r["goal_tok_s"] = GOALS[key]
        if r.get("limit_tok_s"):
            r["fraction_of_limit"] = round(r["dwc_tok_s"] / r["limit_tok_s"], 3)
    (args.out / "perf_gpu_int4.json").write_text(json.dumps(report, indent=1))
    for key, r in res.items():
        print(f"{key:<28}{r['dwc_tok_s']:>11}{r.get('limit_tok_s') or '-':>9}"
              f"{r.get('goal_tok_s', '-'):>8}")
    for row in report["profile_bs1_int4_awq_eager"][:6]:
        print(f"  {row['device_us_per_step']:>9} us  x{row['calls_per_step']:<6} {row['name']}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-perf"))
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--long-prompts", type=int, default=256)
    ap.add_argument("--int4-only", action="store_true", help="build and measure h100-int4-awq")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "llama3-8b-shape"
    report = {"benchmark": "perf_gpu", "device": torch.cuda.get_device_name(0),
              "date": date.today().isoformat(), "commit": os.environ.get("DWC_COMMIT", "?"),
              "torch": torch.__version__, "results": {}}
    res = report["results"]
    bandwidth = read_bandwidth()
    report["read_bandwidth_gbs"] = round(bandwidth / 1e9, 1)
    build_file = prepare_8b(ckpt, report)
    if args.int4_only:
        return int4_run(args, ckpt, build_file, bandwidth, report)
    bundle = args.work / "bundle-fp8"
    report["build_fp8_seconds"] = build(build_file, "h200-fp8", bundle)

    limits = {"bf16": bandwidth / bytes_per_token(ckpt),
              "fp8": bandwidth / bytes_per_token(bundle / "model")}
    report["weight_bytes_per_token"] = {"bf16": bytes_per_token(ckpt),
                                        "fp8": bytes_per_token(bundle / "model")}
    torch.cuda.reset_peak_memory_stats()
    bf16 = Engine(ckpt, EngineConfig(num_blocks=8192, max_num_seqs=128,
                                     max_num_batched_tokens=8192), fusion=DEFAULT_PLAN)
    measure_engine(bf16, "bf16", limits["bf16"], res)
    report["profile_bs1_bf16_eager"] = profile_step(bf16)
    report["peak_memory_gb_bf16"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    del bf16
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fp8 = Engine.from_bundle(bundle)
    report["fp8_engine"] = {"num_blocks": fp8.blocks.blocks.__len__(),
                            "max_num_seqs": fp8.scheduler.max_num_seqs,
                            "max_num_batched_tokens": fp8.scheduler.max_num_batched_tokens}
    measure_engine(fp8, "fp8", limits["fp8"], res)
    res["ttft_1k_fp8_ms"] = ttft_ms(fp8, 1024)
    res["ttft_8k_fp8_ms"] = ttft_ms(fp8, 8000)
    res["throughput_128_128_fp8"] = {"dwc_tok_s": tok_s(fp8, prompts(args.prompts, 128), 128,
                                                        "throughput_128_128"),
                                     "prompts": args.prompts}
    res["throughput_1000_1000_fp8"] = {
        "dwc_tok_s": tok_s(fp8, prompts(args.long_prompts, 1000), 1000, "throughput_1000"),
        "prompts": args.long_prompts}
    report["profile_bs1_fp8_eager"] = profile_step(fp8)
    report["profile_bs128_fp8_eager"] = profile_step(fp8, 128)
    report["peak_memory_gb_fp8"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    del fp8
    torch.cuda.empty_cache()
    base = hf_baseline(ckpt, prompts(1, 128), 256)
    for key, r in res.items():
        if isinstance(r, dict):
            r["baseline_tok_s"] = base if key.startswith("decode_bs1_") else None
            if key in GOALS:
                r["goal_tok_s"] = GOALS[key]
            if r.get("limit_tok_s"):
                r["fraction_of_limit"] = round(r["dwc_tok_s"] / r["limit_tok_s"], 3)
    report["triton_compiles_while_timing"] = COMPILES_WHILE_TIMING
    (args.out / "perf_gpu.json").write_text(json.dumps(report, indent=1))
    print(f"compiles while timing: {COMPILES_WHILE_TIMING}")
    print(f"\n{report['device']}: read bandwidth {report['read_bandwidth_gbs']} GB/s; "
          f"FP8 build {report['build_fp8_seconds']} s; HF eager bs1 {base} tok/s")
    print(f"{'name':<28}{'dwc tok/s':>11}{'limit':>9}{'goal':>8}")
    for key, r in res.items():
        if isinstance(r, dict):
            print(f"{key:<28}{r['dwc_tok_s']:>11}{r.get('limit_tok_s') or '-':>9}"
                  f"{r.get('goal_tok_s', '-'):>8}")
        else:
            print(f"{key:<28}{r:>11}")
    for name in ("decode_bs1_bf16", "decode_bs1_fp8", "decode_bs128_fp8"):
        print(f"{name}: step {res[name]['step_ms']} ms, GPU {res[name]['gpu_step_ms']} ms")
    for name in ("profile_bs1_bf16_eager", "profile_bs1_fp8_eager", "profile_bs128_fp8_eager"):
        print(name)
        for row in report[name][:6]:
            print(f"  {row['device_us_per_step']:>9} us  x{row['calls_per_step']:<6} {row['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
