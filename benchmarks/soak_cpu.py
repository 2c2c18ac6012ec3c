"""Server soak on loopback (issue 10), the full run, on this machine's CPU: `dwc serve`'s
app (uvicorn, in a thread of this process) over the example's cpu-bf16 bundle, 5,000
requests at 64 concurrency: completions and chat, streamed and not, clients that go away
mid-stream or mid-request, 20 kinds of malformed request, probes of /health, /metrics and
/v1/models (dwc.perf.loadtest); then a burst of long requests past a queue limit of 4, and
requests after it. Checks (dwc.perf.soak): every valid request answered 200 and well-formed,
every malformed one a 4xx with a JSON error, the KV block manager's free count back at
its start, no sequence or request object left, resident memory growth after the warm-up
at most --rss-growth-mib, 429s in the burst and service after it.

    python3 benchmarks/soak_cpu.py --out benchmarks/results   # about 2 minutes on 2 cores

The bounded version runs in `make test` (tests/reliability/test_soak.py).
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


def cpu() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def example_bundle() -> Path:
    out = Path(tempfile.mkdtemp(prefix="dwc-soak-")) / "bundle"
    proc = subprocess.run([sys.executable, "-m", "dwc", "build", str(EXAMPLE / "model.yaml"),
                           "-t", "cpu-bf16", "-o", str(out)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"dwc build failed: {proc.stderr[-2000:]}")
    return out


def main() -> int:
    from dwc.perf import loadtest, soak
    from dwc.runtime.engine import Engine, EngineConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, help="a cpu-bf16 bundle (default: build the example)")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--num-blocks", type=int, default=80,
                    help="KV blocks of 16 tokens: small, so that the load preempts")
    ap.add_argument("--rss-growth-mib", type=float, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    commit = os.environ.get("DWC_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    config = dict(num_blocks=args.num_blocks, max_num_seqs=32, max_num_batched_tokens=512)
    engine = Engine.from_bundle(args.bundle or example_bundle(), EngineConfig(**config))
    report = soak.soak(engine, args.requests, args.concurrency, args.max_tokens, args.seed)
    with soak.server_errors() as errors, soak.serving(engine, max_waiting=4) as (url, api):
        burst = loadtest.burst(url, n=96, max_tokens=32, recover=16)
        after = soak.drained(engine, api)
    burst |= {"free_blocks_after": after["free_blocks"], "server_errors": errors}
    checks = soak.soak_checks(report, args.rss_growth_mib) | loadtest.burst_checks(burst)
    checks["no_block_leaked_by_the_burst"] = after["free_blocks"] == args.num_blocks
    checks["no_error_logged_in_the_burst"] = not errors
    result = {"benchmark": "soak_cpu", "date": date.today().isoformat(), "commit": commit,
              "device": cpu(), "model": "examples/stdlib-coder (5.2M-parameter Llama), cpu-bf16",
              "engine": config, "soak": report, "queue_limit": burst, "checks": checks,
              "passed": all(checks.values())}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-{result['date']}-soak.json"
    path.write_text(json.dumps(result, indent=1))
    print_table(report, burst, checks)
    print(f"written to {path}")
    return 0 if result["passed"] else 1


def print_table(report: dict, burst: dict, checks: dict) -> None:
    valid, answered = sum(report["valid"].values()), sum(report["answered"].values())
    rows = [("requests", report["requests"]), ("seconds", report["seconds"]),
            ("valid sent / answered", f"{valid} / {answered}"),
            ("disconnects (stream drop, cancel)",
             f"{report['disconnects']['drop_stream']}, {report['disconnects']['cancel']}"),
            ("malformed sent / 4xx", f"{report['malformed']} / {report['malformed_rejected_4xx']}"),
            ("preemptions", report["preemptions"]),
            ("blocks free start / end", f"{report['blocks']['free_at_start']} / "
                                        f"{report['blocks']['free_at_end']}"),
            ("RSS after warm-up / end (MiB)", f"{report['rss_mib'][0][1]} / {report['rss_mib'][-1][1]}"),
            ("burst served / 429 / after", f"{burst['served']} / {burst['busy']} / "
                                           f"{burst['recovered']} of {burst['recover']}"),
            ("failures", report["failures"] + len(burst["failures"]))]
    for name, value in rows:
        print(f"{name:<36}{value}")
    for name, held in checks.items():
        print(f"{'ok  ' if held else 'FAIL'} {name}")


if __name__ == "__main__":
    sys.exit(main())
