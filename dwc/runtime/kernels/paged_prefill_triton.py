"""Prompt attention over the paged KV cache: every prompt chunk of a step in one kernel.

A chunk is n new tokens of one sequence at positions start..start+n-1 (a whole prompt
when start is 0, a later piece of a chunked prompt otherwise); its K/V are already in the
cache. The kernel is flash attention's forward over variable-length chunks: one program
per (tile of BLOCK_Q queries of one chunk, KV head), whose BLOCK_M = BLOCK_Q x G rows are
those queries for each of the G query heads that share the KV head (GQA: each K/V tile
is loaded, and an FP8 one widened, once for all G). It reads q rows and writes output
rows in place, at each chunk's row offset in the step, and walks the chunk's context
through its block table in tiles of BLOCK_N keys with a running (online) softmax. Keys
below the tile's first position are seen by every query of the tile (no mask); only the
tiles on the diagonal apply the causal mask. An FP8 cache is multiplied in fp16 (one
conversion instruction per pair of values; to bf16 it takes several), the queries
clamped to fp16's range.

It replaces, per layer, the padded SDPA path's gathers of the cache into [B, L] batches,
the FP8 widening, the per-chunk PyTorch calls and the scatter of the output back (about
ten launches a layer and 8.7 ms of a 4 x 2048-token step's 130, profiled on the H200).
The `tiles` table (which chunk and first query each program takes) is built on the host
with the step's other inputs (model_runner.py, kernels/prefill_tiles.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dwc.runtime.kernels.paged_attention_triton import LOG2E
from dwc.runtime.kernels.prefill_tiles import PrefillGroup


@triton.jit(do_not_specialize=["stride_ts"])
def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, tiles_ptr, chunks_ptr,
                          qk_scale, v_scale,
                          stride_qt, stride_qh, stride_ks, stride_kh, stride_ts,
                          stride_ot, stride_oh,
                          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                          PAGE: tl.constexpr, F16: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_Q * GP
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    c = tl.load(tiles_ptr + 2 * tile)
    m0 = tl.load(tiles_ptr + 2 * tile + 1)
    row0 = tl.load(chunks_ptr + 3 * c)
    n = tl.load(chunks_ptr + 3 * c + 1)
    start = tl.load(chunks_ptr + 3 * c + 2)
    d = tl.arange(0, BLOCK_D)   # head_dim padded to a power of two (masked only then)
    dmask = d < D               # used only where BLOCK_D > D
    r = tl.arange(0, BLOCK_M)
    qi = m0 + r // GP                                                    # query in the chunk
    g = r % GP                                                           # its head in the group
    rvalid = (qi < n) & (g < G)
    qpos = start + qi                                                    # absolute positions
    q_off = (row0 + qi).to(tl.int64)[:, None] * stride_qt + (kvh * G + g)[:, None] * stride_qh \
        + d[None, :]
    if BLOCK_D == D:
        rmask = rvalid[:, None]
    else:
        rmask = rvalid[:, None] & dmask[None, :]
    q = tl.load(q_ptr + q_off, mask=rmask, other=0.0)                    # [BLOCK_M, BLOCK_D]
    if F16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    ctx = start + n
    table = tables_ptr + c.to(tl.int64) * stride_ts
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys below the tile's first position: every query sees them, none is masked.
    full = ((start + m0) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        block = tl.load(table + kpos // PAGE)
        off = (block.to(tl.int64) * PAGE + kpos % PAGE)[None, :] * stride_ks \
            + kvh * stride_kh + d[:, None]                               # [BLOCK_D, BLOCK_N]
        if BLOCK_D == D:
            kt = tl.load(k_ptr + off).to(q.dtype)
        else:
            kt = tl.load(k_ptr + off, mask=dmask[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale             # log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if BLOCK_D == D:
            v = tl.load(v_ptr + tl.trans(off)).to(q.dtype)               # [BLOCK_N, BLOCK_D]
        else:
            v = tl.load(v_ptr + tl.trans(off), mask=dmask[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
        m_i = m_new
    # The diagonal: keys up to the tile's last position, masked causally.
    hi = tl.minimum(start + m0 + BLOCK_Q, ctx)
    for n0 in range(full, hi, BLOCK_N):
        kpos = n0 + tl.arange(0, BLOCK_N)
        kvalid = kpos < ctx
        block = tl.load(table + kpos // PAGE, mask=kvalid, other=0)
        off = (block.to(tl.int64) * PAGE + kpos % PAGE)[None, :] * stride_ks \
            + kvh * stride_kh + d[:, None]
        if BLOCK_D == D:
            kmask = kvalid[None, :]
            vmask = kvalid[:, None]
        else:
            kmask = kvalid[None, :] & dmask[:, None]
            vmask = kvalid[:, None] & dmask[None, :]
        kt = tl.load(k_ptr + off, mask=kmask, other=0.0).to(q.dtype)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        seen = (kpos[None, :] <= qpos[:, None]) & kvalid[None, :]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + tl.trans(off), mask=vmask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc * (v_scale / l_i)[:, None]
    o_off = (row0 + qi).to(tl.int64)[:, None] * stride_ot + (kvh * G + g)[:, None] * stride_oh \
        + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=rmask)


def paged_prefill(q: torch.Tensor, cache: torch.Tensor, group: PrefillGroup, scale: float,
                  kv_scales: tuple[float, float], out: torch.Tensor,
                  config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """q, out: [tokens, heads, d] (the step's rows; only the chunks' rows are read and
    written); cache: [2, slots, kv_heads, d], bf16/float32 or FP8 holding K / k_scale and
    V / v_scale. `config`: (BLOCK_N, num_warps, num_stages), for the benchmark's sweep.
    Returns `out`."""
    heads, d = q.shape[1], q.shape[2]
    kv_heads = cache.shape[2]
    k, v = cache[0], cache[1]
    group_size = heads // kv_heads
    fp32 = q.dtype == torch.float32
    fp8 = cache.dtype == torch.float8_e4m3fn
    # From the sweep of benchmarks/attention_gpu.py on the H200 (4 x 2048 and 1 x 8192
    # tokens, 128 rows a program): bf16 363-398 TFLOP/s in 32-key tiles with 8 warps,
    # FP8 291-326 in 64-key tiles with 4 warps. float32 (tests) and wide heads need less
    # shared memory.
    block_n, warps, stages = config or ((32, 4, 2) if fp32 or d > 128 else
                                        (64, 4, 3) if fp8 else (32, 8, 2))
    # The K scale folds into the softmax's (log2) scale, the V scale into the output's.
    _paged_prefill_kernel[(group.tiles.shape[0], kv_heads)](
        q, k, v, out, group.block_tables, group.tiles, group.chunks,
        scale * kv_scales[0] * LOG2E, float(kv_scales[1]),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), group.block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=group_size, GP=triton.next_power_of_2(group_size), D=d,
        BLOCK_D=triton.next_power_of_2(d), BLOCK_Q=group.block_q,
        BLOCK_N=block_n, PAGE=group.page, F16=fp8,
        num_warps=warps, num_stages=stages)
    return out
