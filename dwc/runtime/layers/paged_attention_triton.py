"""Decode attention over the paged KV cache, as one Triton kernel for the whole batch.

One program per (sequence, KV head): it loads the query rows of every query head that
shares that KV head (GQA), walks the sequence's context in tiles of BLOCK_N tokens through
its block table, and keeps a running (online) softmax, so K and V are read once per KV
head. Prefill chunks use the PyTorch path in attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# The block-table width (stride_ts) changes with the longest context on the eager path;
# specializing on it would recompile the kernel as contexts grow.
@triton.jit(do_not_specialize=["stride_ts"])
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale,
                         k_scale, v_scale,
                         stride_qs, stride_qh, stride_ks, stride_kh, stride_ts,
                         stride_os, stride_oh,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                         BLOCK_N: tl.constexpr, PAGE: tl.constexpr):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(lens_ptr + s)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * G + g
    gmask = g < G
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None], other=0.0)                          # [BLOCK_G, D]
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < ctx
        block = tl.load(tables_ptr + s * stride_ts + pos // PAGE, mask=valid, other=0)
        slot = block.to(tl.int64) * PAGE + pos % PAGE
        kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        # FP8 caches hold K / k_scale: widen and rescale (a no-op scale for bf16 caches).
        k = (tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
             * k_scale).to(q.dtype)                                        # [BLOCK_N, D]
        v = (tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
             * v_scale).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + s * stride_os + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def paged_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, page: int, scale: float,
                 kv_scales: tuple[float, float] = (1.0, 1.0), out: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """q: [seqs, heads, d] (one new token each, already in the cache); cache:
    [2, slots, kv_heads, d]; block_tables: [seqs, max_blocks] int32; context_lens: [seqs]
    int32 (tokens including the new one). Returns [seqs, heads, d], in `out` if given."""
    seqs, heads, d = q.shape
    kv_heads = cache.shape[2]
    group = heads // kv_heads
    k, v = cache[0], cache[1]
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    block_n = max(16, min(64, page * 4))
    _paged_decode_kernel[(seqs, kv_heads)](
        q, k, v, out, block_tables, context_lens, scale, kv_scales[0], kv_scales[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=block_n, PAGE=page)
    return out
