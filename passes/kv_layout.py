"""`kv-layout`: plan the paged KV cache for the target (README.md, "Passes").

From the target's memory, the bundle's weight bytes, a workspace reserve and the longest
context (`slo.max_context`, else the model's `max_position_embeddings`), it chooses the
block size, the number of blocks, the most concurrent sequences and the token budget of a
step, and writes every figure of the arithmetic to the manifest's `kv_cache` and to
`reports/kv_plan.json`. The runtime sizes itself from this plan, scaled down (with a
warning) when the machine it runs on has less memory than the target.

The step token budget: with `slo.target_latency_ms`, the prefill chunk that fits in one
step next to the decode of a full batch within that latency on the target's figures
(weights read once per step at the target's bandwidth; 2 FLOPs per parameter per token
at its peak); without it, 8192 tokens on a GPU and 2048 on a CPU.

With tensor parallelism (the target's `tensor_parallel` N) the plan is one rank's: the
target's memory is one GPU's, holding 1/N of the weights (every projection, the embedding
and the lm_head are split; the norms are negligible), its own KV heads (1/N of them, or
one replicated head when there are fewer KV heads than ranks) and 1/N of the FFN
activations. Rank 0 also holds the whole draft, so its share sizes every rank's cache
(all ranks have the same number of blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dwc.config import option, positive
from dwc.perf.costmodel import COMPUTE_BYTES, weight_bytes
from dwc.errors import TargetError
from dwc.model.kvcache import (GPU_WORKSPACE_BYTES, kv_bytes_per_token, kv_scales,
                               step_activation_bytes)
from dwc.passes.base import Pass, PassResult
from dwc.runtime.parallel.layout import kv_heads_per_rank
from dwc.compiler.reports import json_bytes

GB = 1e9
KV_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8_e4m3": 1}


@dataclass
class KvLayoutOptions:
    block_size: int = option(16, help="tokens per KV block (page)")
    memory_utilization: Optional[float] = option(
        None, help="fraction of the target's memory dwc may use (default 0.90 GPU, 0.25 CPU)")
    workspace_gb: Optional[float] = option(
        None, help="memory kept for activations, CUDA graphs and the allocator "
                   "(default 2 GB GPU, 0.5 GB CPU), on top of the per-step estimate")
    max_num_seqs: int = option(
        512, help="upper bound on concurrent sequences (the 8B shape's 128/128 throughput "
                  "on an H200 was highest at 512: docs/RUNTIME.md)")
    host_gib: float = option(0.0, help="host memory (GiB) for prefix-cache blocks evicted from "
                                       "the device cache, copied back on a hit (0: off; "
                                       "docs/RUNTIME.md)")

    def validate(self, path: str) -> None:
        positive(self, path, "block_size", "memory_utilization", "workspace_gb", "max_num_seqs",
                 error=TargetError)
        if self.host_gib < 0:
            raise TargetError(f"{path}.host_gib: must be 0 (off) or more, got {self.host_gib}")


class KvLayout(Pass):
    name = "kv-layout"
    description = ("Plan the paged KV cache from the target's memory, the weights' size and "
                   "the SLO: dtype, block size, blocks, max sequences, step token budget.")
    reads = ("model",)
    optional_reads = ("quantized", "calibration", "draft_model")
    writes = ("kv_plan",)
    Options = KvLayoutOptions

    def key_material(self, ctx, options):
        """Everything the plan reads besides the artifacts: the target and the SLO."""
        t, slo = ctx.target, ctx.build.slo
        return {"target": t.name, "kv": t.kv_cache_dtype, "hardware": vars(t.hardware),
                "weights": vars(t.weights), "device": t.device, "tp": t.tensor_parallel,
                "draft": ctx.artifacts.draft,
                "slo": vars(slo) if slo else None}

    def run(self, ctx, options) -> PassResult:
        plan = plan_kv(ctx, options)
        if plan["dtype"] == "fp8_e4m3":
            plan["kv_scales"] = kv_scales(ctx)
        metrics = {k: plan[k] for k in ("dtype", "block_size", "num_blocks", "max_num_seqs",
                                        "max_num_batched_tokens")}
        if "kv_scales" in plan:
            metrics["max_k_scale"] = max(k for k, _ in plan["kv_scales"])
        return PassResult(outputs={"kv_plan": plan}, metrics=metrics,
                          reports={"kv_plan.json": json_bytes(plan)})


def plan_kv(ctx, options) -> dict:
    t, info, slo = ctx.target, ctx.info, ctx.build.slo
    gpu = t.device == "cuda"
    utilization = options.memory_utilization or (0.90 if gpu else 0.25)
    reserve = options.workspace_gb * GB if options.workspace_gb else \
        (GPU_WORKSPACE_BYTES if gpu else 0.5 * GB)
    max_context = (slo.max_context if slo and slo.max_context else
                   int(info.config.get("max_position_embeddings") or 4096))
    n = t.tensor_parallel
    per_token = kv_bytes_per_token(info, KV_BYTES[t.kv_cache_dtype]) * \
        kv_heads_per_rank(info.num_kv_heads, n) // info.num_kv_heads
    weights = weight_bytes(ctx) // n
    draft = ctx.artifacts.draft_model
    draft_per_token = 0
    if draft is not None:  # its own cache, same slots, in the compute dtype; bf16 weights
        act_kv = KV_BYTES[t.kv_cache_dtype] if t.kv_cache_dtype in COMPUTE_BYTES else \
            COMPUTE_BYTES[t.weights.dtype]
        draft_per_token = kv_bytes_per_token(draft_info(draft), act_kv)
        weights += 2 * sum(p.numel() for p in draft.parameters())
    per_token += draft_per_token
    budget_tokens = step_tokens(ctx, weights, gpu, options.block_size)
    step = step_activation_bytes(info, COMPUTE_BYTES[t.weights.dtype], n, gpu,
                                 options.max_num_seqs, budget_tokens)
    free = t.hardware.memory_gb * GB * utilization - weights - reserve - step
    if free < per_token * max_context:
        raise TargetError(f"target {t.name}: {weights / GB:.2f} GB of weights leave "
                          f"{max(free, 0) / GB:.2f} GB for the KV cache, less than one sequence "
                          f"of max_context {max_context} needs ({per_token * max_context / GB:.2f} GB)")
    blocks_fit = int(free // (per_token * options.block_size))
    per_seq_blocks = -(-max_context // options.block_size)
    max_num_seqs = max(1, min(options.max_num_seqs, blocks_fit // per_seq_blocks * 4))
    num_blocks = min(blocks_fit, max_num_seqs * per_seq_blocks)  # never more than usable
    return {
        "dtype": t.kv_cache_dtype, "block_size": options.block_size, "num_blocks": num_blocks,
        "max_num_seqs": max_num_seqs, "max_num_batched_tokens": budget_tokens,
        "max_context": max_context, "bytes_per_token": per_token,
        "draft_bytes_per_token": draft_per_token, "tensor_parallel": n,
        "host_gib": options.host_gib,
        "arithmetic": {
            "memory_bytes": int(t.hardware.memory_gb * GB), "utilization": utilization,
            "weight_bytes": weights, "workspace_reserve_bytes": int(reserve),
            "step_activation_bytes": int(step), "kv_bytes_available": int(free),
            "kv_tokens_available": int(free // per_token), "blocks_that_fit": blocks_fit,
            "rule": "max_num_seqs = min(cap, fitting blocks / blocks of one max_context "
                    "sequence x 4: sequences average a quarter of max_context); "
                    "num_blocks = min(fitting, max_num_seqs x blocks per sequence)",
        },
    }


def draft_info(draft):
    """The draft's shape as dwc.model.checkpoint reads it (the draft is in memory, not on disk)."""
    from types import SimpleNamespace

    c = draft.config
    return SimpleNamespace(num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads,
                           head_dim=getattr(c, "head_dim", None) or
                           c.hidden_size // c.num_attention_heads)


def step_tokens(ctx, weights: int, gpu: bool, block_size: int) -> int:
    slo, hw = ctx.build.slo, ctx.target.hardware
    if not (slo and slo.target_latency_ms):
        return 8192 if gpu else 2048
    # Per rank: its share of the parameters (the draft's weights are in `weights` whole).
    params = sum(p.numel() for p in ctx.artifacts.model.parameters()) / \
        ctx.target.tensor_parallel
    read_s = weights / (hw.memory_bandwidth_gbs * GB)
    peak = max(hw.peak_tflops.values()) * 1e12
    spare_s = slo.target_latency_ms / 1000 - read_s
    tokens = int(spare_s * peak / (2 * params)) if spare_s > 0 else 0
    tokens = max(256, min(16384, tokens))
    return tokens // block_size * block_size
