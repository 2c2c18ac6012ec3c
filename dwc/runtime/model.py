"""The decoder the runtime runs: Llama / Mistral / Qwen2 over a paged KV cache.

Weights come from the bundle's model/ as transformers loads it: the embedding, the norms'
weights, the rotary frequencies, and the Linear modules themselves. A bf16 bundle's Linears
are plain nn.Linear; a compressed-tensors bundle's Linears are compressed-tensors modules,
whose forward is that library's reference quantized matmul (the CPU path). The runtime
owns everything between them: batching of all sequences' tokens into one matrix per
projection, rotary, paged attention, residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dwc.runtime.layers.attention import paged_attention, write_kv
from dwc.runtime.layers.norm import rms_norm
from dwc.runtime.layers.rotary import Rotary, apply_rotary


ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Batch:
    """One step's input, flattened over its chunks."""

    input_ids: torch.Tensor        # [tokens]
    positions: torch.Tensor        # [tokens]
    slots: torch.Tensor            # [tokens] cache slots the new K/V go to
    chunks: list                   # per chunk: (offset in tokens, length, start, seq_slots)
    sample_rows: torch.Tensor      # [rows whose logits are returned] token rows
    decode: "DecodeGroup | None" = None  # one-token chunks served by the GPU kernel


@dataclass
class DecodeGroup:
    rows: torch.Tensor | None      # [n] token rows the kernel serves (None: every row)
    block_tables: torch.Tensor     # [n, max_blocks] int32
    context_lens: torch.Tensor     # [n] int32, tokens in the cache after this step
    page: int                      # block size


class Decoder:
    def __init__(self, hf_model, device):
        cfg = hf_model.config
        inner = hf_model.model
        self.embed = inner.embed_tokens
        self.layers = inner.layers
        self.final_norm = inner.norm
        self.lm_head = hf_model.lm_head
        self.rotary = Rotary(inner.rotary_emb, device)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.dtype = self.embed.weight.dtype
        self.kv_scales = [(1.0, 1.0)] * len(self.layers)  # set by the runner for FP8 caches
        # The projections each layer calls: the checkpoint's modules, or kernel-backed
        # replacements (use_kernels) on the GPU.
        self.proj = [{**{n: getattr(layer.self_attn, n) for n in ATTN_PROJ},
                      **{n: getattr(layer.mlp, n) for n in MLP_PROJ}} for layer in self.layers]

    def use_kernels(self, model_dir, device) -> int:
        """Swap compressed-tensors Linears for the GPU kernels; returns how many."""
        from dwc.runtime.layers.linear import gpu_linear, raw_tensors

        tensors = raw_tensors(model_dir, device)
        swapped = 0
        for i, proj in enumerate(self.proj):
            for name, module in proj.items():
                part = "self_attn" if name in ATTN_PROJ else "mlp"
                raw = tensors.get(f"model.layers.{i}.{part}.{name}")
                kernel = gpu_linear(module, raw) if raw is not None else None
                if kernel is not None:
                    proj[name] = kernel
                    swapped += 1
        return swapped

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits [sampling chunks, vocab] of each sampling chunk's last token."""
        h = self.embed(batch.input_ids)                                  # [t, hidden]
        cos, sin = self.rotary.cos_sin(batch.positions, h.dtype)
        for layer, proj, layer_cache, scales in zip(self.layers, self.proj, cache, self.kv_scales):
            h = h + self._attention(proj, rms_norm(h, layer.input_layernorm.weight, self.eps),
                                    cos, sin, batch, layer_cache, scales)
            x = rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            h = h + proj["down_proj"](torch.nn.functional.silu(proj["gate_proj"](x)) *
                                      proj["up_proj"](x))
        h = rms_norm(h[batch.sample_rows], self.final_norm.weight, self.eps)
        return self.lm_head(h).float()

    def _attention(self, proj, x, cos, sin, batch: Batch, layer_cache, scales) -> torch.Tensor:
        t = x.shape[0]
        q = proj["q_proj"](x).view(t, self.num_heads, self.head_dim)
        k = proj["k_proj"](x).view(t, self.num_kv_heads, self.head_dim)
        v = proj["v_proj"](x).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv(layer_cache, batch.slots, k, v, scales)
        out = torch.empty_like(q)
        if batch.decode is not None:
            from dwc.runtime.layers.paged_attention_triton import paged_decode

            dg = batch.decode
            if dg.rows is None:
                out = paged_decode(q, layer_cache, dg.block_tables, dg.context_lens, dg.page,
                                   self.scale, scales)
            else:
                out[dg.rows] = paged_decode(q[dg.rows], layer_cache, dg.block_tables,
                                            dg.context_lens, dg.page, self.scale, scales)
        for offset, length, start, seq_slots in batch.chunks:
            out[offset:offset + length] = paged_attention(
                q[offset:offset + length], layer_cache, seq_slots, start, self.scale, scales)
        return proj["o_proj"](out.view(t, self.num_heads * self.head_dim))
