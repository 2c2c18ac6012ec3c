"""Issue 10's reliability suite, counted: runs `tests/reliability` with hypothesis'
statistics and writes what it tried and survived (generated cases per test, tests passed
and failed) with date, machine and commit.

    python benchmarks/reliability_cpu.py --out benchmarks/results

The server soak's own figures come from `benchmarks/soak_cpu.py`.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    junit = args.out / ".reliability-junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--hypothesis-show-statistics", f"--junitxml={junit}",
                           str(ROOT / "tests" / "reliability")],
                          cwd=ROOT, capture_output=True, text=True)
    text = proc.stdout
    # hypothesis prints, per test: "tests/...::name:" then "- N passing, M failing, ..."
    generated = {}
    for name, block in re.findall(r"^(tests/\S+::\S+):\n(.*?)(?=^\S|\Z)", text, re.M | re.S):
        counts = [int(n) for n in re.findall(r"(\d+) passing", block)]
        failing = [int(n) for n in re.findall(r"(\d+) failing", block)]
        generated[name] = {"passing": sum(counts), "failing": sum(failing)}
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", text.splitlines()[-1])
    junit.unlink(missing_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "reliability_cpu", "date": date.today().isoformat(),
              "device": f"{platform.processor() or platform.machine()}, CPU only",
              "commit": commit, "exit_code": proc.returncode,
              "tests": {kind: int(n) for n, kind in summary},
              "generated_cases": generated,
              "generated_total": sum(g["passing"] + g["failing"] for g in generated.values())}
    path = args.out / f"cpu-{result['date']}-reliability.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("tests", "generated_total", "exit_code")}))
    for name, g in generated.items():
        print(f"{name}: {g['passing']} generated cases passed, {g['failing']} failed")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
