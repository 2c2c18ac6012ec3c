"""`dwc bench` on a GGUF bundle: llama.cpp's prompt-processing and generation speed on
this machine's CPU, against transformers on the same CPU with the original model.

Each of `num_prompts` random-token prompts of `input_len` tokens is evaluated from an
empty cache (prompt processing: one batched evaluation) and then decoded greedily for
`output_len` tokens one at a time (generation), batch 1, as llama.cpp's own
`llama-bench` reports pp and tg. The baseline does the same with transformers
(a forward over the prompt, timed; then `generate` with its KV cache, less that prefill
time), same prompts, same run.
Wall-clock times, summed over the prompts.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # dwc.perf.bench imports torch: the llama.cpp child imports this module
    from dwc.perf.bench import BenchConfig


def bench_gguf(bundle: Path, manifest: dict, cfg: BenchConfig, threads: int | None = None) -> dict:
    from dwc.backends.gguf import child as gguf_child
    from dwc.backends.gguf.llama import GGUF_FILE
    from dwc.errors import BadInput
    from dwc.formats import manifest as mf

    if cfg.output_len < 2:
        raise BadInput(f"--output-len {cfg.output_len}: a GGUF bench times generation after the "
                       "first token, so it needs at least 2")
    path = Path(bundle) / mf.MODEL_DIR / GGUF_FILE
    # llama.cpp in a child process: a native crash is an error line, not dwc's death
    batch, prompt_s, gen_s = gguf_child.run("benchmarking", path, llama_bench, path,
                                            cfg.num_prompts, cfg.input_len, cfg.output_len,
                                            cfg.seed, threads)
    result = {"backend": "llama.cpp", "prompts": cfg.num_prompts, "input_len": cfg.input_len,
              "output_len": cfg.output_len,
              "prompt_tok_s": round(cfg.num_prompts * cfg.input_len / prompt_s, 1),
              "generation_tok_s": round(cfg.num_prompts * (cfg.output_len - 1) / gen_s, 1)}
    source = Path(manifest["source"]["model"]["path"])
    if cfg.baseline and (source / "config.json").is_file():
        result["transformers"] = _transformers(source, batch, cfg.output_len, threads)
        t = result["transformers"]
        result["speedup_prompt"] = round(result["prompt_tok_s"] / t["prompt_tok_s"], 2)
        result["speedup_generation"] = round(result["generation_tok_s"] / t["generation_tok_s"],
                                             2)
    elif cfg.baseline:
        result["transformers"] = {"skipped": f"original model not found at {source}"}
    return result


def llama_bench(path: Path, num_prompts: int, input_len: int, output_len: int, seed: int,
                threads: int | None = None, repack: bool | None = None):
    """(the prompts, prompt seconds, generation seconds) of llama.cpp on `path`, summed
    over `num_prompts` random prompts; repack None: dwc's setting (backends/gguf.py)."""
    from dwc.backends.gguf.llama import REPACK, open_model

    llm = open_model(path, input_len + output_len + 8, threads=threads,
                     repack=REPACK if repack is None else repack)
    try:
        rng = random.Random(seed)
        vocab = llm.n_vocab()
        batch = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_prompts)]
        _llama_one(llm, batch[0][:8], 2)  # warm-up
        prompt_s = gen_s = 0.0
        for ids in batch:
            p, g = _llama_one(llm, ids, output_len)
            prompt_s, gen_s = prompt_s + p, gen_s + g
    finally:
        llm.close()
    return batch, prompt_s, gen_s


def _llama_one(llm, ids: list[int], n_out: int) -> tuple[float, float]:
    """Seconds of the prompt evaluation and of n_out - 1 greedy decode steps."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    token = _greedy(llm)
    t1 = time.perf_counter()
    for _ in range(n_out - 1):
        llm.eval([token])
        token = _greedy(llm)
    return t1 - t0, time.perf_counter() - t1


def _greedy(llm) -> int:
    """The argmax of the last evaluated position's logits, read from llama.cpp's context
    (the model is opened without logits_all, so llama-cpp-python keeps no copy)."""
    import llama_cpp

    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))


def _transformers(source: Path, batch: list[list[int]], n_out: int, threads: int | None) -> dict:
    """The original checkpoint in transformers on the CPU (float32: CPU bf16 matmuls are
    slower), the same prompts and lengths."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                 local_files_only=True).eval()
    prompt_s = gen_s = 0.0
    with torch.inference_mode():
        for ids in batch:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            model(x)
            t1 = time.perf_counter()
            model.generate(x, max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False,
                           pad_token_id=0, attention_mask=torch.ones_like(x))
            t2 = time.perf_counter()
            prompt_s += t1 - t0
            # generate's own prefill, timed just before (never below a tenth of the total)
            gen_s += max((t2 - t1) - (t1 - t0), (t2 - t1) / 10)
    return {"prompt_tok_s": round(len(batch) * len(batch[0]) / prompt_s, 1),
            "generation_tok_s": round(len(batch) * (n_out - 1) / gen_s, 1)}


def bench_run(bundle: Path, manifest: dict, cfg: BenchConfig):
    """`dwc bench` on a GGUF bundle: the measurement, its cost, the lines it prints."""
    from dwc.backends.base import BenchRun
    from dwc.perf.bench import cost

    result = {"bundle": str(bundle), "device": "cpu", **bench_gguf(bundle, manifest, cfg)}
    # batch 1: a request takes its prompt and its generation time
    seconds = cfg.input_len / result["prompt_tok_s"] + \
        (cfg.output_len - 1) / result["generation_tok_s"]
    result["cost"] = c = cost(manifest["target"]["hardware"]["usd_per_hour"],
                              result["generation_tok_s"], 1 / seconds)
    lines = [f"llama.cpp     {cfg.num_prompts} x {cfg.input_len} in / {cfg.output_len} out, "
             f"batch 1: prompt {result['prompt_tok_s']} tok/s, generation "
             f"{result['generation_tok_s']} tok/s"]
    base = result.get("transformers") or {}
    if "prompt_tok_s" in base:
        lines.append(f"transformers  prompt {base['prompt_tok_s']} tok/s, generation "
                     f"{base['generation_tok_s']} tok/s (x{result['speedup_prompt']} / "
                     f"x{result['speedup_generation']})")
    elif base:
        lines.append(f"transformers  {base['skipped']}")
    lines.append(f"cost          ${c['usd_per_million_output_tokens']} per million output "
                 f"tokens, ${c['usd_per_million_requests']} per million requests "
                 f"(${c['usd_per_hour']}/h)")
    return BenchRun(result, lines)
