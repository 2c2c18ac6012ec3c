"""Loads the bundle's model, owns the KV cache, turns scheduled chunks into one batch."""

from __future__ import annotations

from pathlib import Path

import torch

from dwc.runtime.block_manager import BlockManager
from dwc.runtime.model import Batch, DecodeGroup, Decoder
from dwc.runtime.scheduler import Chunk


def load_hf_model(model_dir: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    # A compressed-tensors model runs in the dtype it was saved in: transformers refuses to
    # cast a quantized model, and loading one straight into float32 keeps FP8 weights its
    # forward cannot multiply. Unquantized models take the runner's dtype.
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                 trust_remote_code=False)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config.is_quantization_compressed:
        # transformers decompresses on the model's first forward() through a hook; the
        # runtime calls the layers itself, so it decompresses here, once.
        quantizer.compressor.decompress_model(model=model)
        # Decompressing dispatches the modules with offload hooks that run them on the
        # device they were loaded on (the CPU); drop the hooks so .to(device) moves them.
        from compressed_tensors.offload.dispatch import remove_dispatch

        remove_dispatch(model, onload_tensors=True)
    model = model.to(device) if quantizer is not None else model.to(device, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class ModelRunner:
    def __init__(self, model_dir: Path, num_blocks: int, block_size: int, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | None = None):
        self.device = device
        self.hf_model = load_hf_model(model_dir, device, dtype)
        self.decoder = Decoder(self.hf_model, device)
        self.kernels = self.decoder.use_kernels(model_dir, device) if device == "cuda" else 0
        d = self.decoder
        slots = num_blocks * block_size
        self.cache = [torch.zeros(2, slots, d.num_kv_heads, d.head_dim, dtype=kv_dtype or d.dtype,
                                  device=device) for _ in range(len(d.layers))]
        self.block_size = block_size

    @property
    def max_context(self) -> int:
        return int(self.hf_model.config.max_position_embeddings)

    def run(self, chunks: list[Chunk], blocks: BlockManager) -> torch.Tensor:
        """Run one step; logits [chunks that sample, vocab], in chunk order."""
        return self.decoder.forward(self._batch(chunks, blocks), self.cache)

    def _batch(self, chunks: list[Chunk], blocks: BlockManager) -> Batch:
        """Flatten the chunks. On the GPU, one-token (decode) chunks go to the Triton
        kernel as one group; the others keep the per-sequence PyTorch path."""
        ids, positions, slots, parts, rows = [], [], [], [], []
        decode_rows, tables = [], []
        kernel = self.device == "cuda"
        offset = 0
        for c in chunks:
            tokens = c.seq.tokens
            span = range(c.start, c.start + c.length)
            ids.extend(tokens[i] for i in span)
            positions.extend(span)
            slots.extend(blocks.slot(c.seq, p) for p in span)
            if kernel and c.length == 1:
                decode_rows.append(offset)
                tables.append(list(c.seq.block_table))
            else:
                seq_slots = [blocks.slot(c.seq, p) for p in range(c.start + c.length)]
                parts.append((offset, c.length, c.start,
                              torch.tensor(seq_slots, device=self.device)))
            offset += c.length
            if c.samples:
                rows.append(offset - 1)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        return Batch(as_tensor(ids), as_tensor(positions), as_tensor(slots), parts,
                     as_tensor(rows), self._decode_group(chunks, decode_rows, tables))

    def _decode_group(self, chunks, rows, tables) -> DecodeGroup | None:
        if not rows:
            return None
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        lens = [c.start + 1 for c in chunks if self.device == "cuda" and c.length == 1]
        return DecodeGroup(
            rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=self.device),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            page=self.block_size)
