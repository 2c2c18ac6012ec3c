"""Host time per decode step, two trees interleaved (issue 18): `host_gpu.py` run in
turn for this tree and an earlier one (A B A B ...), each run measuring every batch
`--repeat` times, so that drift of the machine (clocks, other tenants) shows as spread
instead of as a difference between trees. Prints the median of each tree's runs and the
ratio; writes every run under --out.

    git archive <commit> dwc | tar -x -C .ab/base
    DWC_COMMIT=<hash> python3 benchmarks/host_ab_gpu.py --base .ab/base --base-commit <c> \\
        --out $OUT [--rounds 3 --steps 100 --repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_run(tag: str, pythonpath: str | None, commit: str, args, round_: int) -> dict:
    env = dict(os.environ, DWC_COMMIT=commit)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    out = args.out / f"{tag}-{round_}"
    subprocess.run([sys.executable, str(HERE / "host_gpu.py"), "--out", str(out), "--tag", tag,
                    "--steps", str(args.steps), "--repeat", str(args.repeat), "--no-profile"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / f"host_gpu_{tag}.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", required=True, help="folder holding the earlier tree's dwc/")
    ap.add_argument("--base-commit", default="base")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    head = os.environ.get("DWC_COMMIT", "head")
    runs: dict[str, list] = {"head": [], "base": []}
    for r in range(args.rounds):
        runs["head"].append(one_run("head", None, head, args, r))
        runs["base"].append(one_run("base", args.base, args.base_commit, args, r))
    table = {}
    for key in runs["head"][0]["runs"]:
        med = {t: statistics.median(x["runs"][key]["wall_ms"] for x in runs[t]) for t in runs}
        spread = {t: [x["runs"][key]["wall_ms"] for x in runs[t]] for t in runs}
        table[key] = {"head_ms": med["head"], "base_ms": med["base"],
                      "base_over_head": round(med["base"] / med["head"], 3), "runs": spread}
    report = {"benchmark": "host_ab_gpu", "device": runs["head"][0]["device"],
              "date": runs["head"][0]["date"], "commit": head, "baseline_commit": args.base_commit,
              "rounds": args.rounds, "steps": args.steps, "repeat": args.repeat,
              "dwc": {t: runs[t][0]["dwc"] for t in runs}, "table": table}
    (args.out / "host_ab_gpu.json").write_text(json.dumps(report, indent=1))
    print(f"wall ms per step, median of {args.rounds} interleaved runs ({head} vs "
          f"{args.base_commit}): batch | head | base | base/head | head runs | base runs")
    for key, row in table.items():
        print(f"{key:>13} | {row['head_ms']:6.3f} | {row['base_ms']:6.3f} | "
              f"{row['base_over_head']:5.2f} | {row['runs']['head']} | {row['runs']['base']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
