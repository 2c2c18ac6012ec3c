"""The tensorrt-llm backend's bundle: model/ is ModelOpt's unified Hugging Face checkpoint
(what `trtllm-serve <dir>` and `LLM(model=<dir>)` load in TensorRT-LLM 1.x), serve/ the
`trtllm-serve` command and an LLM-API options file made from the kv-layout plan.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from dwc.bundle.writer import BundleWriter
from dwc.constants import NGRAM_MAX_N
from dwc.formats import hf
from dwc.formats import manifest as mf

SERVE_DIR = "serve"
OPTIONS_FILE = "llm_api_options.yaml"
GB = 1e9


def emit(writer: BundleWriter, ctx) -> None:
    source_dir, quantized = ctx.info.path, ctx.artifacts.quantized
    for f in sorted(quantized.folder.iterdir()):
        if f.is_file() and f.name not in hf.TOKENIZER_FILES:
            writer.copy_file(f"{mf.MODEL_DIR}/{f.name}", f)
    for name in hf.TOKENIZER_FILES:  # byte for byte from the checkpoint, as every backend
        if (Path(source_dir) / name).is_file():
            writer.copy_file(f"{mf.MODEL_DIR}/{name}", Path(source_dir) / name)
    options = llm_api_options(ctx.artifacts.kv_plan, quantized.summary["weight_bytes"],
                              ctx.target.hardware.memory_gb, ctx.artifacts.draft)
    writer.write_bytes(f"{SERVE_DIR}/{OPTIONS_FILE}",
                       yaml.safe_dump(options, sort_keys=False).encode())
    writer.write_bytes(f"{SERVE_DIR}/trtllm-serve.sh", serve_script().encode())


def llm_api_options(plan: dict, weight_bytes: int, memory_gb: float,
                    draft: dict | None = None) -> dict:
    """TensorRT-LLM's LLM-API options from dwc's KV plan: the same cache dtype, the same
    number of KV bytes (as the fraction of the memory left after the weights that
    TensorRT-LLM takes), batch and token limits, CUDA graphs up to the batch limit; with
    the build's speculation, its method with the K the build chose (paths are
    relative to the bundle, where serve/trtllm-serve.sh runs; TensorRT-LLM before 1.2
    named `speculative_model` `speculative_model_dir`)."""
    kv_bytes = plan["num_blocks"] * plan["block_size"] * plan["bytes_per_token"]
    free = memory_gb * GB - weight_bytes
    batch = plan["max_num_seqs"]
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if s < batch] + [batch]
    return {
        "kv_cache_config": {
            "dtype": "fp8" if plan["dtype"] == "fp8_e4m3" else "auto",
            "free_gpu_memory_fraction": round(min(0.95, kv_bytes / free), 4),
            "enable_block_reuse": True,
            "tokens_per_block": plan["block_size"],
        },
        "max_batch_size": batch,
        "max_num_tokens": plan["max_num_batched_tokens"],
        "max_seq_len": plan["max_context"],
        "cuda_graph_config": {"batch_sizes": sizes, "enable_padding": True},
    } | _speculative_config(draft)


def _speculative_config(draft: dict | None) -> dict:
    """The build's speculation as TensorRT-LLM's LLM API spells it: draft-target with the
    bundle's draft, or its NGram drafter matching up to dwc's longest n-gram, the latest
    occurrence, each request's own text (as dwc's proposer does)."""
    method = mf.speculation(draft)
    if method == "draft_model":
        return {"speculative_config": {"decoding_type": "DraftTarget", "max_draft_len": draft["k"],
                                       "speculative_model": mf.DRAFT_DIR}}
    if method == "ngram":
        return {"speculative_config": {"decoding_type": "NGram", "max_draft_len": draft["k"],
                                       "max_matching_ngram_size": NGRAM_MAX_N,
                                       "is_use_oldest": False, "is_public_pool": False}}
    return {}


def serve_args(host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """`trtllm-serve` arguments, run from the bundle's folder."""
    return [mf.MODEL_DIR, "--backend", "pytorch", "--extra_llm_api_options",
            f"{SERVE_DIR}/{OPTIONS_FILE}", "--host", host, "--port", str(port)]


def serve_script() -> str:
    return f"""#!/bin/sh
# Serve this bundle with TensorRT-LLM's OpenAI-compatible server (TensorRT-LLM 1.x reads
# the quantization from model/hf_quant_config.json): sh serve/trtllm-serve.sh [more flags]
# Runs from the bundle's folder: the options' paths (the draft) are relative to it.
cd "$(dirname "$0")/.." || exit 1
exec trtllm-serve {shlex.join(serve_args())} "$@"
"""
