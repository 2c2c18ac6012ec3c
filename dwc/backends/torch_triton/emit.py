"""The torch-triton backend's model/: a Hugging Face checkpoint (config.json, safetensors,
tokenizer), loadable as it is by transformers and vLLM, and by dwc's runtime. Quantized
models are in the compressed-tensors layout (with llm-compressor's recipe.yaml).
serve/vllm.sh is the `vllm serve` command for the same bundle, from the KV plan.
"""

from __future__ import annotations

import json
import shlex

from dwc.bundle.draft import copy_tokenizer
from dwc.bundle.writer import BundleWriter
from dwc.constants import MAX_SHARD_SIZE, NGRAM_MAX_N, NGRAM_MIN_N
from dwc.formats import hf
from dwc.formats import manifest as mf
from dwc.compiler.manifest import serving_facts
from dwc.compiler.templating import render

VLLM_SCRIPT = f"{mf.SERVE_DIR}/vllm.sh"
# dwc's KV cache dtypes as vLLM's --kv-cache-dtype spells them ("fp8" is E4M3 there);
# "auto" is the model's dtype, which vLLM prefers to an explicit "bfloat16".
VLLM_KV_DTYPES = {"fp8_e4m3": "fp8", "bfloat16": "auto", "float16": "auto", "float32": "auto"}


def emit(writer: BundleWriter, ctx) -> None:
    """model/: the quantize pass's compressed-tensors files as they are, or the bf16 model."""
    model, source_dir = ctx.artifacts.model, ctx.info.path
    quantized = ctx.artifacts.quantized
    if quantized is not None:
        for f in sorted(quantized.folder.iterdir()):
            if f.is_file() and f.name not in hf.TOKENIZER_FILES:
                writer.copy_file(f"{mf.MODEL_DIR}/{f.name}", f)
    else:
        out = writer.path(f"{mf.MODEL_DIR}/{hf.CONFIG}").parent
        model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    copy_tokenizer(writer, source_dir, mf.MODEL_DIR)
    writer.write_bytes(VLLM_SCRIPT, render("vllm.sh.j2", command=vllm_command(serving_facts(ctx)),
                                           model_dir=mf.MODEL_DIR).encode())


def vllm_serve_args(m: dict, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """`vllm serve` arguments for a bundle described by `m` (its manifest, or the same
    keys: name, kv_cache, draft), run from the bundle's folder: the KV plan's cache dtype,
    page size, KV bytes (so vLLM neither profiles nor reserves a share of memory by
    itself), batch and token limits, and the speculation the build chose (the draft, or
    n-gram lookup) with its K. The
    served name is the manifest's, as with `dwc serve`, so clients need no change."""
    plan = m["kv_cache"]
    args = [mf.MODEL_DIR, "--served-model-name", m["name"],
            "--kv-cache-dtype", VLLM_KV_DTYPES[plan["dtype"]]]
    if plan.get("num_blocks"):
        per_token = plan["bytes_per_token"] + plan.get("draft_bytes_per_token", 0)
        args += ["--block-size", str(plan["block_size"]),
                 "--kv-cache-memory-bytes", str(plan["num_blocks"] * plan["block_size"] * per_token),
                 "--max-num-seqs", str(plan["max_num_seqs"]),
                 "--max-num-batched-tokens", str(plan["max_num_batched_tokens"]),
                 "--max-model-len", str(plan["max_context"])]
    if plan.get("tensor_parallel", 1) > 1:  # the plan is one rank's: KV bytes are per GPU
        args += ["--tensor-parallel-size", str(plan["tensor_parallel"])]
    method = mf.speculation(m.get("draft"))
    if method == "draft_model":
        spec = {"model": mf.DRAFT_DIR, "num_speculative_tokens": m["draft"]["k"],
                "method": "draft_model"}
        args += ["--speculative-config", json.dumps(spec)]
    elif method == "ngram":  # vLLM's prompt lookup, with dwc's n-gram sizes
        spec = {"method": "ngram", "num_speculative_tokens": m["draft"]["k"],
                "prompt_lookup_min": NGRAM_MIN_N, "prompt_lookup_max": NGRAM_MAX_N}
        args += ["--speculative-config", json.dumps(spec)]
    return args + ["--host", host, "--port", str(port)]


def vllm_command(m: dict) -> str:
    """The command line, quoted for a POSIX shell."""
    return shlex.join(["vllm", "serve", *vllm_serve_args(m)])
