"""Speculative decoding on the GPU: train a target, build it with a distilled draft, measure.

1. Trains a ~190M-parameter Llama (16 layers, hidden 1024, GQA 16/4) on the device's own
   Python standard library (and transformers' and torch's sources) for `--train-seconds`,
   with the example model's tokenizer; calibration and evaluation text are held-out
   stdlib files.
2. `dwc build -t h200-fp8` with `draft: auto`: calibration, FP8 quantization, the
   distill-draft pass on the GPU (its measured tau, c and K), the KV plan, evaluation.
   The pass measures every candidate (draft model, EAGLE head, n-gram) and ships the
   winner; when that is not the head, a second build with `candidates=[eagle]` ships one
   (calibration and quantization come from the pass cache).
3. The bundles in dwc's runtime without speculation and with each candidate (the chosen
   one, the head, n-gram lookup forced with `ngram=True`), greedy, 128-token prompts
   from the evaluation text and 256 new tokens, at batch 1, 8 and 32: output tokens/s,
   the speedup, and the acceptance the runtime measured (the same greedy tokens as
   without speculation is checked too). Sampled runs (temperature 0.8) at batch 1.
4. With `--k-sweep`: the chosen method's measured speedup at batch 1 for K = 2, 4, 6, 8.
5. The Llama-3-8B shape: c measured in dwc's runtime (batch-1 decode step of a 0.45B
   draft shape over the 8B's, random bf16 weights), c from weight bytes read per token,
   and the projected speedup tau / (1 + K c) with the tau measured on the trained pair.

    DWC_COMMIT=<hash> python3 benchmarks/speculative_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from make_example_model import corpus_files, split_of  # noqa: E402

from dwc.runtime.engine import Engine, EngineConfig  # noqa: E402
from dwc.runtime.sequence import SamplingParams  # noqa: E402
from dwc.runtime.speculative import SpecStats  # noqa: E402

TOKENIZER = ROOT / "examples" / "stdlib-coder" / "checkpoint"
TARGET = dict(hidden=1024, layers=16, heads=16, kv_heads=4, ffn=2816)
SEQ_LEN, BATCH = 512, 32


class SMOKE:
    """`--smoke`: the whole script on this machine's CPU with a tiny target, a few
    training seconds and short runs, so that its paths are checked before a device call
    spends minutes on them (the figures mean nothing)."""
    on = False
    device = "cuda"
    batches = (1, 8, 32)
    n_out = 256
    prompts = 32
    distill = dict(batch_size=16, windows=4096, on_policy=512, on_policy_tokens=256,
                   positions=192, eagle_max_seconds=90)


def smoke() -> None:
    global SEQ_LEN, BATCH
    SMOKE.on, SMOKE.device, SMOKE.batches, SMOKE.n_out, SMOKE.prompts = True, "cpu", (1, 2), 12, 4
    TARGET.update(hidden=128, layers=4, heads=4, kv_heads=2, ffn=256)
    SMOKE.distill = dict(batch_size=4, windows=64, on_policy=8, on_policy_tokens=16,
                         positions=32, eagle_max_seconds=10)
    SEQ_LEN, BATCH = 64, 4


def autocast():
    return torch.autocast(SMOKE.device, dtype=torch.bfloat16, enabled=not SMOKE.on)


def sync() -> None:
    if SMOKE.device == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if SMOKE.device == "cuda":
        torch.cuda.empty_cache()


def corpus(extra_mb: float) -> dict[str, list[str]]:
    """The stdlib split as the example model splits it (calibration and evaluation text
    are held out), plus up to `extra_mb` of the installed transformers' and torch's
    Python sources for training only."""
    import sysconfig

    import transformers

    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[str]] = {"train": [], "calib": [], "eval": []}
    for path in corpus_files():
        rel = path.relative_to(root).as_posix()
        try:
            parts[split_of(rel)].append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    budget = extra_mb * 1e6
    for package in (Path(transformers.__file__).parent, Path(torch.__file__).parent):
        for path in sorted(package.rglob("*.py")):
            if budget <= 0:
                break
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            parts["train"].append(text)
            budget -= len(text)
    return parts


def train_target(text: dict, out: Path, seconds: float) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    def encode(texts):  # a list: the fast tokenizer spreads it over the cores
        return torch.tensor([t for ids in tok(texts)["input_ids"] for t in ids], dtype=torch.long)

    ids = encode(text["train"])
    eval_ids = encode(text["eval"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=TARGET["hidden"],
                      intermediate_size=TARGET["ffn"], num_hidden_layers=TARGET["layers"],
                      num_attention_heads=TARGET["heads"], num_key_value_heads=TARGET["kv_heads"],
                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(SMOKE.device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=SMOKE.device == "cuda")
    rng = random.Random(0)
    gpu_ids = ids.to(SMOKE.device)
    t0, step, loss = time.time(), 0, float("nan")
    while time.time() - t0 < seconds:
        frac = (time.time() - t0) / seconds
        for g in opt.param_groups:  # warm-up, then cosine to 10%
            g["lr"] = 6e-4 * min(1.0, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        starts = torch.tensor([rng.randrange(len(ids) - SEQ_LEN - 1) for _ in range(BATCH)])
        x = gpu_ids[starts[:, None] + torch.arange(SEQ_LEN)[None].to(starts)]
        with autocast():
            loss_t = model(x, labels=x).loss
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0:
            loss = loss_t.item()
            print(f"  step {step}  loss {loss:.3f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad(), autocast():
        for i in range(0, min(len(eval_ids) - SEQ_LEN, 64 * SEQ_LEN), SEQ_LEN):
            w = eval_ids[i:i + SEQ_LEN][None].to(SMOKE.device)
            nll += model(w, labels=w).loss.item()
            n += 1
    model.to(torch.bfloat16).save_pretrained(out)
    for f in TOKENIZER.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            shutil.copy(f, out / f.name)
    params = sum(p.numel() for p in model.parameters())
    del model, opt
    empty_cache()
    return {"params": params, "steps": step, "tokens": step * BATCH * SEQ_LEN,
            "train_tokens_available": len(ids), "heldout_ppl": round(math.exp(nll / n), 2),
            "seconds": round(time.time() - t0, 1)}


def build(folder: Path, text: dict, steps: int, name: str = "bundle",
          candidates: str | None = None) -> dict:
    # Calibration text for the draft's distillation: held-out stdlib files and 4 MB of
    # the target's training text (what the target knows is what the draft must learn).
    (folder / "calib.txt").write_text(("\n".join(text["calib"]) + "\n".join(text["train"]))[:4_600_000])
    (folder / "eval.txt").write_text("\n".join(text["eval"])[:600_000])
    (folder / "model.yaml").write_text(
        "name: spec-target\nmodel: ./target\n"
        "calibration: {data: ./calib.txt, samples: 64, seq_len: 512}\n"
        "evaluation: {data: ./eval.txt, samples: 32, seq_len: 512, max_ppl_increase_pct: 2.0}\n"
        "draft: auto\noptimization: auto\n")
    t0 = time.time()
    only = ["--set", f"distill-draft.candidates=[{candidates}]",
            "--set", f"distill-draft.ship={candidates}"] if candidates else []
    run = subprocess.run([sys.executable, "-m", "dwc", "build", str(folder / "model.yaml"),
                          "-t", "h200-fp8", "-o", str(folder / name), "--json", *only,
                          "--set", f"distill-draft.steps={steps}",
                          *[a for k, v in SMOKE.distill.items()
                            for a in ("--set", f"distill-draft.{k}={v}")]],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"build failed ({run.returncode}): {run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    manifest = json.loads((folder / name / "manifest.json").read_text())
    return {"seconds": round(time.time() - t0, 1), "draft": manifest["draft"],
            "quality": manifest["quality"],
            "passes": {p["name"]: p.get("seconds") for p in manifest["passes"]}}


def eval_prompts(folder: Path, tok, n: int, length: int = 128) -> list[list[int]]:
    ids = tok(Path(folder / "eval.txt").read_text())["input_ids"]
    step = max(length, (len(ids) - length) // n)
    return [ids[i:i + length] for i in range(0, step * n, step)][:n]


def timed(engine: Engine, groups: list, params: SamplingParams) -> tuple[float, list, dict | None]:
    """Mean output tok/s over the groups (each generated as one batch), their outputs,
    and the runtime's acceptance over all of them."""
    if engine.drafter:
        engine.drafter.stats = SpecStats()
    speeds, outs = [], []
    for prompts in groups:
        sync()
        t0 = time.perf_counter()
        done = engine.generate(prompts, params)
        sync()
        speeds.append(sum(len(o.output_ids) for o in done) / (time.perf_counter() - t0))
        outs += [o.output_ids for o in done]
    return round(sum(speeds) / len(speeds), 1), outs, engine.speculation()


def measure(bundle: Path, head_bundle: Path | None, prompts: list, n_out: int,
            k_sweep: bool) -> dict:
    """Each speculating engine against the engine without speculation, same prompts."""
    results = {}
    greedy = SamplingParams(max_tokens=n_out, ignore_eos=True)
    # The engines live at once: each gets a fixed cache (131k tokens), not 90% of the GPU.
    plan = json.loads((bundle / "manifest.json").read_text())["kv_cache"]
    config = EngineConfig.from_plan(plan, num_blocks=8192, max_num_seqs=64)
    engines = {"off": Engine.from_bundle(bundle, config, speculative=False),
               "chosen": Engine.from_bundle(bundle, config),
               "ngram": Engine.from_bundle(bundle, config, ngram=True)}
    if head_bundle is not None:
        engines["eagle"] = Engine.from_bundle(head_bundle, config)
    for eng in engines.values():  # warm-up: kernels compiled, allocator primed
        eng.generate([prompts[0][:32]] * 2, SamplingParams(max_tokens=24, ignore_eos=True))
    results["graphs"] = {k: e.runner.graphs is not None for k, e in engines.items()}
    for batch in SMOKE.batches:
        # batch 1: four prompts one after another; larger batches: one batch.
        groups = [[p] for p in prompts[:4]] if batch == 1 else [prompts[:batch]]
        off, off_out, _ = timed(engines["off"], groups, greedy)
        row = {"dwc_tok_s_no_draft": off}
        for name, eng in engines.items():
            if name == "off":
                continue
            on, on_out, spec = timed(eng, groups, greedy)
            same = sum(a == b for a, b in zip(on_out, off_out))
            row[name] = {"tok_s": on, "speedup": round(on / off, 3), "runtime_speculation": spec,
                         "greedy_identical": f"{same}/{len(on_out)}"}
        results[f"batch{batch}"] = row
    sampled = SamplingParams(max_tokens=n_out, temperature=0.8, ignore_eos=True, seed=0)
    groups = [[p] for p in prompts[:2]]
    s_off, _, _ = timed(engines["off"], groups, sampled)
    row = {"dwc_tok_s_no_draft": s_off}
    for name in ("chosen", "eagle"):
        if name in engines:
            s_on, _, spec = timed(engines[name], groups, sampled)
            row[name] = {"tok_s": s_on, "speedup": round(s_on / s_off, 3),
                         "runtime_speculation": spec}
    results["batch1_sampled_t0.8"] = row
    base = results["batch1"]["dwc_tok_s_no_draft"]
    del engines
    empty_cache()
    if not k_sweep:
        return results
    # K against measured speed at batch 1 (the pass chose K from tau / (1 + K c)).
    sweep = {}
    for k in (2, 4, 6, 8):
        eng = Engine.from_bundle(bundle, EngineConfig.from_plan(
            plan, num_blocks=2048, max_num_seqs=8, num_speculative_tokens=k))
        eng.generate([prompts[0][:32]], SamplingParams(max_tokens=24, ignore_eos=True))
        tok_s, _, spec = timed(eng, [[p] for p in prompts[:4]], greedy)
        sweep[k] = {"tok_s": tok_s, "speedup": round(tok_s / base, 3),
                    "tau": spec["mean_accepted_tokens"]}
        del eng
        empty_cache()
    results["batch1_k_sweep"] = sweep
    return results


def measured_c_8b() -> dict:
    """c for the Llama-3-8B shape in dwc's runtime on this GPU: batch-1 decode step of a
    0.45B-parameter draft shape (12 layers, hidden 1024, Llama-3 vocabulary) over the 8B
    target's, both bf16 with random weights (the FP8 path is slower than bf16 in today's
    host-bound runtime, so bf16 is the fairer target)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dwc.perf.calibration import decode_step_seconds
    from dwc.runtime.model_runner import ModelRunner

    shapes = {"target_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8),
              "draft_0.45b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                                  num_attention_heads=16, num_key_value_heads=4)}
    seconds, params = {}, {}
    torch.set_default_dtype(torch.bfloat16)
    try:
        for name, shape in shapes.items():
            cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, **shape)
            with torch.device("cuda"):
                model = LlamaForCausalLM(cfg).eval()
            params[name] = sum(p.numel() for p in model.parameters())
            seconds[name] = decode_step_seconds(ModelRunner(model, 64, 16, "cuda"))
            del model
            torch.cuda.empty_cache()
    finally:
        torch.set_default_dtype(torch.float32)
    return {"params": params, "step_ms": {k: round(v * 1000, 3) for k, v in seconds.items()},
            "cost_ratio": round(seconds["draft_0.45b"] / seconds["target_8b"], 4)}


def projection_8b(tau: list[float], measured_c: float) -> dict:
    """Projected 8B speedups tau / (1 + K c) with the tau measured on the trained pair: c
    as measured in today's runtime, and c from weight bytes read per decoded token (the
    embedding reads one row; everything else whole) for an FP8 target and bf16 drafts,
    which is what a runtime at the bandwidth limit would see."""
    hidden, ffn, vocab, kv = 4096, 14336, 128256, 1024
    layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn
    target = 32 * layer * 1 + vocab * hidden * 2
    small = 12 * (2 * 1024 * 1024 + 2 * 1024 * 256 + 3 * 1024 * 4096) * 2 + vocab * 1024 * 2
    cases = {"0.45B draft, c measured in dwc's runtime (bf16 8B)": measured_c,
             "0.45B draft, c from bytes (FP8 8B)": small / target,
             "size rule (4 of 32 layers), c from bytes (FP8 8B)": (4 * layer * 2 + vocab * hidden * 2) / target}
    out = {}
    for name, c in cases.items():
        speedups = [t / (1 + (k + 1) * c) for k, t in enumerate(tau)]
        best = max(range(len(tau)), key=speedups.__getitem__)
        out[name] = {"cost_ratio": round(c, 4), "best_k": best + 1,
                     "projected_speedup": round(speedups[best], 3)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-seconds", type=float, default=150)
    ap.add_argument("--distill-steps", type=int, default=2000)
    ap.add_argument("--extra-corpus-mb", type=float, default=60)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwc-spec"))
    ap.add_argument("--k-sweep", action="store_true")
    ap.add_argument("--no-8b", action="store_true", help="skip the 8B shape's measured c")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny run on this machine's CPU that checks the script's paths")
    args = ap.parse_args()
    if args.smoke:
        smoke()
        args.no_8b, args.extra_corpus_mb = True, 0
    from transformers import AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    text = corpus(args.extra_corpus_mb)
    result = {"device": torch.cuda.get_device_name(0) if SMOKE.device == "cuda" else "cpu (smoke)", "date": date.today().isoformat(),
              "commit": os.environ.get("DWC_COMMIT", "unknown"), "torch": torch.__version__}
    result["target"] = dict(train_target(text, args.work / "target", args.train_seconds), **TARGET)
    print("target", result["target"], flush=True)
    result["build"] = build(args.work, text, args.distill_steps)
    print("build", json.dumps(result["build"])[:600], flush=True)
    head_bundle = None
    if result["build"]["draft"]["method"] != "eagle":
        # the head shipped whatever its projection, so that the runtime measures it
        result["build_eagle"] = build(args.work, text, args.distill_steps, "bundle-eagle", "eagle")
        print("build (head)", json.dumps(result["build_eagle"])[:400], flush=True)
        head_bundle = args.work / "bundle-eagle"
    (args.out / "speculative.json").write_text(json.dumps(result, indent=1))
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    prompts = eval_prompts(args.work, tok, SMOKE.prompts)
    result["results"] = measure(args.work / "bundle", head_bundle, prompts, SMOKE.n_out,
                                args.k_sweep)
    (args.out / "speculative.json").write_text(json.dumps(result, indent=1))
    d = result["build"]["draft"]
    if not args.no_8b and d.get("per_k"):
        result["c_8b"] = measured_c_8b()
        result["projection_8b"] = projection_8b(d["per_k"]["tau"], result["c_8b"]["cost_ratio"])
        (args.out / "speculative.json").write_text(json.dumps(result, indent=1))
    print(f"\ntarget {result['target']['params'] / 1e6:.0f}M params, held-out ppl "
          f"{result['target']['heldout_ppl']}; chosen {d['method']} K={d['k']}, pass tau "
          f"{d['mean_accepted_tokens']}, c {d['cost_ratio']}")
    for c in d.get("candidates", []):
        print(f"  candidate {c.get('method')}: K={c.get('k')} tau "
              f"{c.get('mean_accepted_tokens')} c {c.get('cost_ratio')} "
              f"projected {c.get('projected_speedup')}")
    print(f"graphs: {result['results']['graphs']}")
    print(f"{'run':<22}{'engine':<8}{'tok/s':>9}{'off':>9}{'speedup':>9}{'tau':>7}  same")
    for name, r in result["results"].items():
        if name in ("batch1_k_sweep", "graphs"):
            continue
        for eng, v in r.items():
            if eng == "dwc_tok_s_no_draft":
                continue
            s = v["runtime_speculation"] or {}
            print(f"{name:<22}{eng:<8}{v['tok_s']:>9}{r['dwc_tok_s_no_draft']:>9}"
                  f"{v['speedup']:>9}{s.get('mean_accepted_tokens')!s:>7}  "
                  f"{v.get('greedy_identical', '-')}")
    if "batch1_k_sweep" in result["results"]:
        print("batch 1 by K: " + ", ".join(f"K={k} {v['speedup']}x (tau {v['tau']})"
                                           for k, v in result["results"]["batch1_k_sweep"].items()))
    if "c_8b" in result:
        print(f"8B shape in dwc's runtime: step {result['c_8b']['step_ms']} ms, "
              f"c = {result['c_8b']['cost_ratio']}")
        for name, p in result["projection_8b"].items():
            print(f"8B projection, {name}: c={p['cost_ratio']} K={p['best_k']} "
                  f"speedup {p['projected_speedup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
