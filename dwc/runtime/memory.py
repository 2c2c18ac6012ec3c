"""How many KV blocks the engine allocates: the plan's, or fewer where they do not fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dwc.constants import MAX_GRAPH_TOKENS, graph_sizes
from dwc.model.checkpoint import model_info
from dwc.model.eagle_head import eagle_taps, is_eagle
from dwc.model.kvcache import GPU_WORKSPACE_BYTES, kv_bytes_per_token, step_activation_bytes
from dwc.runtime.host_tier import STAGING_BYTES as HOST_TIER_STAGING_BYTES

CPU_KV_BUDGET_BYTES = 256 << 20  # KV cache size on CPU when the bundle has no plan


def fit_blocks(model_dir: Path, draft_dir: Path | None, c, device: str,
               dtype: torch.dtype, k: int = 0) -> int:
    """`c`: the EngineConfig. The planned number of blocks, scaled down (with a warning)
    to what fits here: on CPU a fixed budget, on a GPU 90% of the memory free before the
    weights load, less the weights' size on disk and what the kv-layout plan keeps for a
    step (its workspace reserve, activations, graph logits and pool, for this config's
    batch limits; the host tier's staging buffers when it has one): an H200 plan on an
    80 GB H100 ran out of memory when only the weights were counted (2026-12-07). A
    block holds the target's K/V and the draft's. With tensor parallelism, rank 0's share: 1/N of the weights, its KV heads, and
    the whole draft (which runs there unsplit). `k`: speculative tokens per sequence:
    the decode graphs then cover 1 + k rows a sequence, and a draft model keeps logits
    for graphs of its own (an EAGLE head: the target's graphs keep its tapped layers)."""
    import warnings

    from dwc.runtime.parallel.layout import kv_heads_per_rank

    itemsize = 1 if c.kv_dtype == "fp8_e4m3" else dtype.itemsize
    info, n = model_info(model_dir), c.tensor_parallel
    per_token = kv_bytes_per_token(info, itemsize) * \
        kv_heads_per_rank(info.num_kv_heads, n) // info.num_kv_heads
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / n
    folders = []
    # An EAGLE head's cache is one layer of the target's shape.
    draft = None if draft_dir is None else replace(info, num_layers=1) \
        if is_eagle(draft_dir) else model_info(draft_dir)
    if draft:
        per_token += kv_bytes_per_token(draft, dtype.itemsize)
        folders.append(draft_dir)
    per_block = per_token * c.block_size
    if device == "cuda":
        weights += sum(f.stat().st_size for d in folders for f in Path(d).glob("*.safetensors"))
        step = _gpu_step_bytes(info, draft, draft_dir, c, dtype, k)
        budget = torch.cuda.mem_get_info()[0] * 0.9 - weights - GPU_WORKSPACE_BYTES - step
    else:
        budget = CPU_KV_BUDGET_BYTES
    fits = max(int(budget // per_block), 4)
    if c.num_blocks is None:
        return fits
    if c.num_blocks > fits:
        warnings.warn(f"KV plan asks for {c.num_blocks} blocks; {fits} fit on this "
                      f"{device}: using {fits}")
        return fits
    return c.num_blocks


def _gpu_step_bytes(info, draft, draft_dir: Path | None, c, dtype: torch.dtype, k: int) -> int:
    """What a GPU keeps besides weights and KV for this config (fit_blocks)."""
    rows = min(c.max_num_seqs * (1 + k), MAX_GRAPH_TOKENS) if c.cuda_graphs else 0
    step = step_activation_bytes(info, dtype.itemsize, c.tensor_parallel, True, c.max_num_seqs,
                                 c.max_num_batched_tokens, rows)
    if draft and is_eagle(draft_dir):  # the target's graphs keep the head's layers
        hidden = len(eagle_taps(draft_dir)) * info.hidden_size * dtype.itemsize
        step += (sum(graph_sizes(rows)) + c.max_num_batched_tokens) * hidden
    elif draft:  # the draft's decode graphs keep their own logits
        step += sum(graph_sizes(rows)) * draft.vocab_size * 4
    if c.kv_host_gib > 0:
        step += HOST_TIER_STAGING_BYTES
    return step
