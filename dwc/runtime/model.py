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


@dataclass
class Batch:
    """One step's input, flattened over its chunks."""

    input_ids: torch.Tensor        # [tokens]
    positions: torch.Tensor        # [tokens]
    slots: torch.Tensor            # [tokens] cache slots the new K/V go to
    chunks: list                   # per chunk: (offset in tokens, length, start, seq_slots)
    sample_rows: torch.Tensor      # [chunks that sample] row of their last token


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

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: list[torch.Tensor]) -> torch.Tensor:
        """Logits [sampling chunks, vocab] of each sampling chunk's last token."""
        h = self.embed(batch.input_ids)                                  # [t, hidden]
        cos, sin = self.rotary.cos_sin(batch.positions, h.dtype)
        for layer, layer_cache in zip(self.layers, cache):
            h = h + self._attention(layer, rms_norm(h, layer.input_layernorm.weight, self.eps),
                                    cos, sin, batch, layer_cache)
            x = rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            h = h + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        h = rms_norm(h[batch.sample_rows], self.final_norm.weight, self.eps)
        return self.lm_head(h).float()

    def _attention(self, layer, x, cos, sin, batch: Batch, layer_cache) -> torch.Tensor:
        attn = layer.self_attn
        t = x.shape[0]
        q = attn.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv(layer_cache, batch.slots, k, v)
        out = torch.empty_like(q)
        for offset, length, start, seq_slots in batch.chunks:
            out[offset:offset + length] = paged_attention(
                q[offset:offset + length], layer_cache, seq_slots, start, self.scale)
        return attn.o_proj(out.view(t, self.num_heads * self.head_dim))
