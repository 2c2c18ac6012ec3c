"""Attention over the paged KV cache (plain PyTorch path; used on CPU).

The cache is one tensor per layer, [2, num_slots, kv_heads, head_dim], slot = block *
block_size + offset. A chunk of n new tokens at positions start..start+n-1 first writes
its K/V into its slots, then attends, causally, to every cached position of its sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


FP8_MAX = 448.0


def write_kv(cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """cache: [2, slots, kv_heads, d]; slots: [tokens]; k, v: [tokens, kv_heads, d].
    An FP8 cache holds k / k_scale and v / v_scale, saturated to the FP8 range."""
    if cache.dtype == torch.float8_e4m3fn:
        k = (k.float() / scales[0]).clamp(-FP8_MAX, FP8_MAX)
        v = (v.float() / scales[1]).clamp(-FP8_MAX, FP8_MAX)
    cache[0, slots] = k.to(cache.dtype)
    cache[1, slots] = v.to(cache.dtype)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, seq_slots: torch.Tensor,
                    start: int, scale: float, kv_scales: tuple[float, float] = (1.0, 1.0)
                    ) -> torch.Tensor:
    """One sequence's chunk.

    q: [n, heads, d] for positions start..start+n-1; seq_slots: [start + n] the slots of
    positions 0..start+n-1. Returns [n, heads, d].
    """
    n, heads, _ = q.shape
    k = cache[0, seq_slots].to(q.dtype) * kv_scales[0]                   # [T, kv_heads, d]
    v = cache[1, seq_slots].to(q.dtype) * kv_scales[1]
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)                                # [T, heads, d]
    v = v.repeat_interleave(group, dim=1)
    total = k.shape[0]
    # 4-D [1, heads, tokens, d]: SDPA's flash and memory-efficient kernels need it (3-D
    # inputs fall back to the math path, which materialises heads x n x T scores).
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    if start == 0:  # a whole prompt: plain causal attention
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
    else:
        # Query i (position start + i) sees positions 0..start + i.
        mask = torch.arange(total, device=q.device)[None, :] <= \
            (start + torch.arange(n, device=q.device))[:, None]          # [n, T]
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)                                        # [n, heads, d]


def prompt_attention(q: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                     flat: torch.Tensor, scale: float,
                     kv_scales: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Whole prompts (chunks from position 0) of several sequences in one call.

    q: [B, L, heads, d], each sequence's queries right-padded to L; slots: [B, L] their
    cache slots (padding repeats a real one); flat: [real tokens] b * L + i of each real
    (not padding) query. Causal attention never lets a real query see a padded key
    (padding comes after every real position), so padding only costs compute. Returns
    [real tokens, heads, d] in the order of `flat` (an index, not a boolean mask: a mask
    would make the host wait for the GPU to count it).
    """
    k = cache[0, slots].to(q.dtype) * kv_scales[0]                   # [B, L, kv_heads, d]
    v = cache[1, slots].to(q.dtype) * kv_scales[1]
    q4, k4, v4 = (x.transpose(1, 2) for x in (q, k, v))              # [B, heads, L, d]
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale,
                                         enable_gqa=True)
    b, heads, length, d = out.shape
    return out.transpose(1, 2).reshape(b * length, heads, d)[flat]
