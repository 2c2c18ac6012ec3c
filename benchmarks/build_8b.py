"""Build time of a Llama-3-8B-shaped checkpoint, per pass, on the lent GPU.

Makes the checkpoint on the device (random bf16 weights: build speed does not depend on
the weights), then runs `dwc build` for each target and reports each pass's seconds and
the whole build's, against the goal (DESIGN.md §9: h200-fp8 without a draft <= 180 s).

    python benchmarks/build_8b.py --targets h200-fp8,h100-int4-awq --out $OUT

Needs examples/stdlib-coder (tokenizer, calib.txt, eval.txt) carried along; writes
`build_8b.json` to --out and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "stdlib-coder"
GOAL_SECONDS = {"h200-fp8": 180, "h100-fp8": 180}


def make_checkpoint(folder: Path) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(EXAMPLE / "checkpoint" / name, folder / name)
    return time.perf_counter() - t0


def build(build_file: Path, target: str, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dwc", "build", str(build_file), "-t", target,
                           "-o", str(out), "--json", "--no-cache"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        result = {"error": {"message": proc.stderr[-2000:]}}
    if "error" in result:
        return {"target": target, "ok": False, "wall_seconds": round(wall, 1),
                "error": result["error"], "stderr_tail": proc.stderr[-3000:]}
    m = result["manifest"]
    return {"target": target, "ok": True, "wall_seconds": round(wall, 1),
            "passes": {p["name"]: p["seconds"] for p in m["passes"]},
            "build_seconds": m["build"]["seconds"], "quality": m["quality"],
            "quantization": m["quantization"],
            "bundle_bytes": sum(f["bytes"] for f in m["files"].values())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="h200-fp8")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-bench"))
    args = ap.parse_args()
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / "llama3-8b-shape"
    made = None if (ckpt / "config.json").exists() else make_checkpoint(ckpt)
    bf = args.work / "model.yaml"
    bf.write_text(f"""name: llama3-8b-shape
model: {ckpt}
calibration: {{data: {EXAMPLE / 'calib.txt'}, samples: 128, seq_len: 512}}
evaluation: {{data: {EXAMPLE / 'eval.txt'}, samples: 64, seq_len: 512, max_ppl_increase_pct: 2.0}}
draft: none
""")
    os.environ.setdefault("DWC_CACHE_DIR", str(args.work / "cache"))
    rows = [build(bf, t, args.work / f"bundle-{t}") for t in args.targets.split(",")]
    # The device's copy of the tree has no .git: pass DWC_COMMIT=<hash> from here.
    commit = os.environ.get("DWC_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
        text=True).stdout.strip() or "unknown"
    report = {"benchmark": "build_8b", "date": date.today().isoformat(),
              "device": torch.cuda.get_device_name(0), "commit": commit,
              "torch": torch.__version__, "checkpoint_seconds": made, "builds": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build_8b.json").write_text(json.dumps(report, indent=2))
    print(f"\nbuild of the Llama-3-8B shape on {report['device']} (commit {commit})")
    print(f"{'target':16} {'ok':3} {'total s':>8} {'goal s':>7}  passes (s)")
    for r in rows:
        passes = " ".join(f"{k}={v:.1f}" for k, v in r.get("passes", {}).items())
        goal = GOAL_SECONDS.get(r["target"], "-")
        total = r.get("build_seconds", r["wall_seconds"])
        print(f"{r['target']:16} {'yes' if r['ok'] else 'NO':3} {total:8.1f} {goal!s:>7}  "
              f"{passes or r.get('error')}")
        if r["ok"]:
            q = r["quality"]
            print(f"{'':16} ppl {q['baseline']:.2f} -> {q['optimized']:.2f} "
                  f"({q['delta_pct']:+.3f}%), KL {q['kl_divergence']:.2e}, "
                  f"bundle {r['bundle_bytes'] / 1e9:.2f} GB")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
