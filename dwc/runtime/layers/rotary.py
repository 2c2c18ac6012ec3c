"""Rotary position embeddings (the rotate-half convention of the HF Llama family).

The inverse frequencies, scaling rules (Llama-3, YaRN, ...) and attention scaling come
from transformers' own rotary module for the checkpoint's config, so every rope variant
transformers supports is computed exactly as it computes it.
"""

from __future__ import annotations

import torch


class Rotary:
    def __init__(self, hf_rotary, device):
        self.inv_freq = hf_rotary.inv_freq.float().to(device)            # [head_dim / 2]
        self.scale = float(getattr(hf_rotary, "attention_scaling", 1.0))

    def cos_sin(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [tokens] -> cos, sin: [tokens, head_dim]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos, sin: [tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
