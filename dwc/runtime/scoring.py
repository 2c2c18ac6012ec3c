"""Scoring text through the runtime's own decoder and paged KV cache.

The quality gate measures the optimized model the way the runtime will run it: its
decoder, its attention, its quantized kernels on the GPU, its KV cache dtype.
"""

from __future__ import annotations

from pathlib import Path

from dwc.runtime.block_manager import BlockManager
from dwc.runtime.model_runner import ModelRunner
from dwc.runtime.scheduler import Chunk
from dwc.runtime.sequence import SamplingParams, Sequence


def runtime_logits(model, device: str, weights_dir: Path | None = None,
                   kv_dtype: str | None = None, kv_scales: list | None = None,
                   block_size: int = 16, fusion: dict | None = None):
    """An ids [b, s] -> logits [b, s, vocab] function over a loaded model."""
    state: dict = {}

    def fn(ids):
        b, s = ids.shape
        need = b * -(-s // block_size)
        if state.get("blocks", 0) < need:
            state["runner"] = ModelRunner(model, need, block_size, device, weights_dir,
                                          kv_dtype, kv_scales, fusion=fusion)
            state["blocks"] = need
        blocks = BlockManager(state["blocks"], block_size)
        seqs = [Sequence(row.tolist(), SamplingParams(max_tokens=1)) for row in ids]
        for seq in seqs:
            blocks.grow(seq, s)
        logits = state["runner"].run([Chunk(seq, 0, s, logits=s) for seq in seqs], blocks)
        return logits.view(b, s, -1)
    return fn
