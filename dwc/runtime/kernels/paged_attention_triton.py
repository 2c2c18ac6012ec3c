"""Decode attention over the paged KV cache, as one Triton kernel for the whole batch.

One program per (sequence, KV head): it loads the query rows of every query head that
shares that KV head (GQA), walks the sequence's context in tiles of BLOCK_N tokens through
its block table, and keeps a running (online) softmax, so K and V are read once per KV
head. An FP8 cache is multiplied in fp16. Longer chunks go to the paged prefill kernel
(paged_prefill_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


LOG2E = 1.4426950408889634


# The block-table width (stride_ts) changes with the longest context on the eager path;
# specializing on it would recompile the kernel as contexts grow.
@triton.jit(do_not_specialize=["stride_ts"])
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, rows_ptr,
                         qk_scale, v_scale,
                         stride_qs, stride_qh, stride_ks, stride_kh, stride_ts,
                         stride_os, stride_oh,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                         BLOCK_N: tl.constexpr, PAGE: tl.constexpr, HAS_ROWS: tl.constexpr,
                         F16: tl.constexpr):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(lens_ptr + s)
    row = tl.load(rows_ptr + s).to(tl.int64) if HAS_ROWS else s.to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * G + g
    gmask = g < G
    q = tl.load(q_ptr + row * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None], other=0.0)                          # [BLOCK_G, D]
    if F16:  # an FP8 cache: multiplied in fp16, the queries clamped to its range
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    table = tables_ptr + s.to(tl.int64) * stride_ts
    for start in range(0, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < ctx
        block = tl.load(table + pos // PAGE, mask=valid, other=0)
        slot = block.to(tl.int64) * PAGE + pos % PAGE
        kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        # FP8 caches hold K / k_scale: widened as they are (to fp16: one instruction per
        # pair; to bf16 it takes several and bounds the kernel at about half the
        # bandwidth, measured), the scales applied to the scores and the output.
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0).to(q.dtype)  # [BLOCK_N, D]
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # log2 units
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    out = acc * (v_scale / l)[:, None]
    tl.store(out_ptr + row * stride_os + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def _tiles(dtype: torch.dtype, d: int, programs: int, fp8: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages), from the sweep of benchmarks/attention_gpu.py on
    the H200 (results/h200-2026-12-04-attention-*.json): 128-key tiles and 4 warps were
    best or within 2% for bf16 caches at batch 1-512 and for FP8 ones up to 32
    sequences; with many programs (8 KV heads x 256-512 sequences) an FP8 cache reads
    fastest in 64-key tiles with 2 warps (3.2 against 2.5 TB/s). float32 (tests) and
    wide heads need less shared memory."""
    if dtype == torch.float32 or d > 128:
        return 32, 4, 2
    if fp8 and programs >= 1024:
        return 64, 2, 3
    return 128, 4, 3


def paged_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, page: int, scale: float,
                 kv_scales: tuple[float, float] = (1.0, 1.0), out: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, config: tuple[int, int, int] | None = None
                 ) -> torch.Tensor:
    """q: [tokens, heads, d]; the kernel serves one token per entry of block_tables
    ([n, max_blocks] int32) and context_lens ([n] int32, tokens including the new one,
    which is already in the cache): q's row rows[i] (token row i when `rows` is None),
    written to the same row of `out` (a new [n, heads, d] tensor when `out` is None and
    `rows` is too). cache: [2, slots, kv_heads, d]. `config`: (BLOCK_N, num_warps,
    num_stages), for the benchmark's sweep. Returns the output tensor."""
    heads, d = q.shape[1], q.shape[2]
    n = context_lens.shape[0]
    kv_heads = cache.shape[2]
    group = heads // kv_heads
    k, v = cache[0], cache[1]
    if out is None:
        out = torch.empty_like(q) if rows is not None else \
            torch.empty(n, heads, d, dtype=q.dtype, device=q.device)
    block_n, warps, stages = config or _tiles(q.dtype, d, n * kv_heads,
                                              cache.dtype == torch.float8_e4m3fn)
    _paged_decode_kernel[(n, kv_heads)](
        q, k, v, out, block_tables, context_lens, rows if rows is not None else context_lens,
        scale * kv_scales[0] * LOG2E, float(kv_scales[1]),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=d, BLOCK_N=block_n,
        PAGE=page, HAS_ROWS=rows is not None, F16=cache.dtype == torch.float8_e4m3fn,
        num_warps=warps, num_stages=stages)
    return out
