"""First GPU check of dwc's runtime (plain PyTorch path, no Triton kernels or CUDA graphs yet).

1. Exactness on the GPU: the example bundle's greedy output from dwc's engine in float32
   equals transformers' greedy output in float32 on the same GPU.
2. Speed, Llama-3-8B shape (random bf16 weights), 128 prompt / 128 new tokens, greedy:
   dwc's engine (bf16, and the h200-fp8 bundle when given) against transformers' eager
   `generate` measured in the same run, at batch 1 and batch 64.

    python benchmarks/runtime_gpu.py --bundle <example cpu-bf16 bundle> --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

from dwc.runtime.engine import Engine, EngineConfig
from dwc.runtime.sequence import SamplingParams

PROMPTS = ["import os\nimport sys\n\ndef main():\n", "class Foo(object):\n    def __init__(self"]


def exactness(bundle: Path) -> dict:
    from transformers import AutoModelForCausalLM

    eng = Engine.from_bundle(bundle, EngineConfig(device="cuda", dtype="float32", num_blocks=256))
    hf = AutoModelForCausalLM.from_pretrained(bundle / "model", dtype=torch.float32).cuda()
    same = []
    for p in PROMPTS:
        ours = eng.generate([p], SamplingParams(max_tokens=48, ignore_eos=True))[0].output_ids
        ids = eng.tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids.cuda()
        ref = hf.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, ids.shape[1]:].tolist()
        same.append(ours == ref)
    return {"greedy_identical": all(same), "prompts": len(same)}


def dwc_speed(model_dir: Path, prompts: list, n_out: int) -> float:
    params = SamplingParams(max_tokens=n_out, ignore_eos=True)
    eng = Engine(model_dir, EngineConfig(device="cuda", dtype="bfloat16", num_blocks=4096,
                                         max_num_seqs=len(prompts), max_num_batched_tokens=8192))
    eng.generate([prompts[0][:16]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.generate(prompts, params)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del eng
    torch.cuda.empty_cache()
    return round(len(prompts) * n_out / seconds, 1)


def speed(ckpt: Path, batch: int, fp8_model: Path | None, n_in: int = 128, n_out: int = 128) -> dict:
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (n_in,), generator=gen).tolist() for _ in range(batch)]
    result = {"batch": batch, "input": n_in, "output": n_out,
              "dwc_tok_s": dwc_speed(ckpt, prompts, n_out)}
    if fp8_model is not None:
        result["dwc_fp8_tok_s"] = dwc_speed(fp8_model, prompts, n_out)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).cuda()
    ids = torch.tensor(prompts, device="cuda")
    hf.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    hf_s = time.perf_counter() - t0
    del hf
    torch.cuda.empty_cache()
    result["hf_eager_tok_s"] = round(batch * n_out / hf_s, 1)
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/dwc-bench/llama3-8b-shape"))
    ap.add_argument("--fp8-bundle", type=Path, default=None, help="an h200-fp8 bundle of --ckpt")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    report = {"benchmark": "runtime_gpu", "date": date.today().isoformat(),
              "device": torch.cuda.get_device_name(0), "commit": os.environ.get("DWC_COMMIT", "?"),
              "torch": torch.__version__, "exactness": exactness(args.bundle)}
    if not (args.ckpt / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from build_8b import make_checkpoint
        make_checkpoint(args.ckpt)
    fp8 = args.fp8_bundle / "model" if args.fp8_bundle else None
    report["speed"] = [speed(args.ckpt, b, fp8) for b in (1, 64)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"\nruntime on {report['device']}: greedy identical to transformers (fp32): "
          f"{report['exactness']['greedy_identical']}")
    print(f"{'batch':>5} {'dwc bf16':>9} {'dwc fp8':>8} {'HF eager bf16':>14}  "
          "output tok/s (8B shape, 128 in / 128 out)")
    for r in report["speed"]:
        print(f"{r['batch']:5d} {r['dwc_tok_s']:9.1f} {r.get('dwc_fp8_tok_s', 0):8.1f} "
              f"{r['hf_eager_tok_s']:14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
